//! Lazy restore (`migd restore --lazy`): the process runs at once and its private
//! anonymous pages fault in from pages.img. Real processes, as root: every page is
//! checked by the restored program itself (a zero or stale page changes its
//! checksums and its count of bad words), and its output must equal an uninterrupted
//! run's.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Fills `MiB` MiB with a pattern, says `filled`, waits for SIGUSR1, then checks every
/// word against the pattern, printing a checksum per 16 MiB group (slowly with a
/// second argument: `ms` milliseconds after each group), the number of bad words and
/// `done`. Its verify speed goes to stderr.
const BIG_C: &str = r#"
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <signal.h>
#include <unistd.h>
#include <time.h>
#include <sys/mman.h>
static volatile sig_atomic_t go;
static void on_usr1(int s) { (void)s; go = 1; }
static inline uint64_t pat(uint64_t i) { return (i * 0x9E3779B97F4A7C15ULL) ^ (i >> 3) ^ 0x5bd1e995ULL; }
int main(int argc, char **argv) {
    size_t mib = strtoull(argv[1], 0, 10);
    int pause_ms = argc > 2 ? atoi(argv[2]) : 0;
    size_t n = (mib << 20) / 8;
    struct sigaction sa = {0};
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, 0);
    uint64_t *b = mmap(0, n * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (b == MAP_FAILED) return 2;
    for (size_t i = 0; i < n; i++) b[i] = pat(i);
    printf("filled %zu MiB\n", mib);
    fflush(stdout);
    while (!go) usleep(1000);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    size_t bad = 0, group = (16 << 20) / 8;
    for (size_t g = 0; g < n; g += group) {
        uint64_t h = 1469598103934665603ULL;
        for (size_t i = g; i < g + group && i < n; i++) {
            if (b[i] != pat(i)) bad++;
            h = (h ^ b[i]) * 1099511628211ULL;
        }
        printf("group %zu %016llx\n", g / group, (unsigned long long)h);
        fflush(stdout);
        if (pause_ms) usleep(pause_ms * 1000);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double ms = (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6;
    fprintf(stderr, "verify %zu MiB in %.1f ms (%.0f MB/s)\n", mib, ms, (mib << 20) / ms / 1e3);
    fflush(stderr);
    printf("bad %zu\ndone\n", bad);
    return bad != 0;
}
"#;

/// A program writing its stdout and stderr to files in `dir`.
struct Prog {
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

fn run_prog(dir: &Path, tag: &str, argv: &[&str]) -> Prog {
    let out = dir.join(format!("{tag}.out"));
    let err = dir.join(format!("{tag}.err"));
    let child = Command::new(argv[0])
        .args(&argv[1..])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    Prog { child, out, err }
}

/// Waits until `path` contains `needle`; panics after `limit` naming `what`.
fn wait_for(path: &Path, needle: &str, limit: Duration, what: &str) {
    let t0 = Instant::now();
    loop {
        let s = std::fs::read_to_string(path).unwrap_or_default();
        if s.contains(needle) {
            return;
        }
        assert!(
            t0.elapsed() < limit,
            "{what}: {needle:?} did not appear in {} within {limit:?}; it holds {:?}",
            path.display(),
            &s[s.len().saturating_sub(300)..]
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn usr1(pid: i32) {
    assert!(
        Command::new("kill")
            .args(["-USR1", &pid.to_string()])
            .status()
            .unwrap()
            .success(),
        "kill -USR1 {pid}"
    );
}

/// The reference run: uninterrupted, told to go once filled.
fn reference(dir: &Path, argv: &[&str]) -> Vec<u8> {
    let mut p = run_prog(dir, "ref", argv);
    wait_for(&p.out, "filled", Duration::from_secs(60), "reference run");
    usr1(p.child.id() as i32);
    let st = p.child.wait().unwrap();
    assert!(st.success(), "reference run of {argv:?} failed: {st}");
    std::fs::read(&p.out).unwrap()
}

/// The program, run (output "mig.out") until it says `filled`.
fn started(dir: &Path, argv: &[&str]) -> Prog {
    let p = run_prog(dir, "mig", argv);
    wait_for(
        &p.out,
        "filled",
        Duration::from_secs(60),
        "run before the dump",
    );
    p
}

/// Runs the program until it says `filled`, then dumps it (killed) into `images`;
/// returns its output file.
fn run_and_dump(dir: &Path, argv: &[&str], images: &Path) -> Prog {
    let mut p = started(dir, argv);
    dump_ok(&p.child.id().to_string(), images, "dumping the program");
    let _ = p.child.wait();
    p
}

/// Kills a restored process's pid namespace (its stub) if it still runs when the
/// test ends, e.g. after a failed assertion left it waiting for pages.
struct StubGuard(i32);

impl Drop for StubGuard {
    fn drop(&mut self) {
        let ours = std::fs::read_to_string(format!("/proc/{}/cmdline", self.0))
            .is_ok_and(|c| c.contains("migd") && c.contains("--lazy"));
        if ours && alive(self.0) {
            let _ = Command::new("kill")
                .args(["-9", &self.0.to_string()])
                .status();
        }
    }
}

/// `migd restore --lazy` running, as its first line told.
struct LazyRun {
    _guard: StubGuard,
    child: Child,
    lines: BufReader<std::process::ChildStdout>,
    outer_pid: i32,
    stub_pid: i32,
    uffd_fd: i32,
}

fn field(line: &str, before: &str, after: &str) -> Option<i32> {
    line.split(before)
        .nth(1)?
        .split(after)
        .next()?
        .trim()
        .parse()
        .ok()
}

fn start_lazy(images: &Path, extra: &[&str]) -> LazyRun {
    let mut child = Command::new(migd())
        .args(["restore", "--lazy", "--images"])
        .arg(images)
        .args(extra)
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    lines.read_line(&mut line).unwrap();
    let parsed = (|| {
        Some((
            field(&line, "(pid ", " here")?,
            field(&line, "init stub ", ")")?,
            field(&line, "uffd ", " in the stub")?,
        ))
    })();
    match parsed {
        Some((outer_pid, stub_pid, uffd_fd)) => LazyRun {
            _guard: StubGuard(stub_pid),
            child,
            lines,
            outer_pid,
            stub_pid,
            uffd_fd,
        },
        None => {
            let o = child.wait_with_output().unwrap();
            panic!(
                "lazy restore from {} failed: {line}{}",
                images.display(),
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
}

impl LazyRun {
    /// Waits for `migd restore` to end; returns (success, rest of stdout, stderr).
    fn finish(mut self) -> (bool, String, String) {
        let mut out = String::new();
        self.lines.read_to_string(&mut out).unwrap();
        let mut err = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let st = self.child.wait().unwrap();
        (st.success(), out, err)
    }
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// Restores `images` lazily with `extra` options, lets the program verify, and
/// checks its output; returns migd's "all pages in" line (if any) and the program's
/// verify line.
fn lazy_round(
    images: &Path,
    out: &Path,
    err: &Path,
    reference: &[u8],
    extra: &[&str],
) -> (String, String) {
    let r = start_lazy(images, extra);
    assert!(
        alive(r.outer_pid) && alive(r.stub_pid) && r.uffd_fd >= 0,
        "after `running`, the process {} and its stub {} run and the stub holds the userfaultfd ({})",
        r.outer_pid,
        r.stub_pid,
        r.uffd_fd
    );
    usr1(r.outer_pid);
    let (ok, rest, stderr) = r.finish();
    assert!(ok, "migd restore --lazy {extra:?} failed: {rest}{stderr}");
    let got = std::fs::read(out).unwrap();
    assert_same_output(&format!("lazy restore {extra:?}"), reference, &got);
    let verify = std::fs::read_to_string(err).unwrap_or_default();
    let verify = verify.lines().last().unwrap_or("").to_string();
    let all_in = rest
        .lines()
        .find(|l| l.starts_with("all pages in"))
        .unwrap_or("")
        .to_string();
    (all_in, verify)
}

#[test]
fn one_gib_process_restored_lazily_sees_every_page_and_ends_as_uninterrupted() {
    let dir = tempdir();
    let exe = compile_c(dir.path(), "big", BIG_C, &["-O2"]);
    let argv = [exe.to_str().unwrap(), "1024"];
    let reference = reference(dir.path(), &argv);
    let images = dir.path().join("img");
    let p = run_and_dump(dir.path(), &argv, &images);
    // The restored program rewrites its output from where it was at the dump.
    let filled = std::fs::read(&p.out).unwrap();
    for (what, extra) in [
        ("with prefetch", &[][..]),
        // As after a pre-copy whose rounds the destination read meanwhile.
        (
            "with prefetch, pages.img read before",
            &["--warm-mib", "1024"][..],
        ),
        ("faults only, 1 MiB read-ahead", &["--no-prefetch"][..]),
        (
            "faults only, 64 KiB read-ahead",
            &["--no-prefetch", "--readahead", "65536"][..],
        ),
    ] {
        std::fs::write(&p.out, &filled).unwrap();
        std::fs::write(&p.err, b"").unwrap();
        let (all_in, verify) = lazy_round(&images, &p.out, &p.err, &reference, extra);
        println!("lazy restore of 1 GiB, {what}: {all_in} | program: {verify}");
        // The pages read before came from memory, checked, not from pages.img.
        let before: u64 = all_in
            .rsplit(", ")
            .next()
            .and_then(|t| t.strip_suffix(" bytes read before the restore"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no 'read before' figure in {all_in:?}"));
        if extra.contains(&"--warm-mib") {
            assert!(
                before > 1000 << 20,
                "{what}: only {before} bytes from memory"
            );
        } else {
            assert_eq!(before, 0, "{what}");
        }
    }
}

/// While its pages are still missing, the program drops two ranges (MADV_DONTNEED:
/// must read zeros, then and after the prefetch; the second one is read only in
/// phase 2), moves a range (mremap: must keep its contents; its last MiB is read only
/// in phase 2), unmaps one and maps fresh memory there (zeros), and forks a child that
/// checks pages neither of them had touched; then it splits the area with mprotect
/// where nothing was read yet (a copy across a vma boundary fails as a whole) and
/// checks the rest, and grows the moved range with mremap. After SIGUSR1 again (once
/// every page is in) it checks everything once more, the grown tail too.
const EVENTS_C: &str = r#"
#define _GNU_SOURCE
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <signal.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/wait.h>
#define MB (1UL << 20)
static volatile sig_atomic_t go;
static void on_usr1(int s) { (void)s; go = 1; }
static inline uint64_t pat(uint64_t i) { return (i * 0x9E3779B97F4A7C15ULL) ^ (i >> 3) ^ 0x5bd1e995ULL; }
static size_t bad(const uint64_t *p, size_t first, size_t n) {
    size_t b = 0;
    for (size_t k = 0; k < n; k++) b += p[k] != pat(first + k);
    return b;
}
static size_t nonzero(const uint64_t *p, size_t n) {
    size_t b = 0;
    for (size_t k = 0; k < n; k++) b += p[k] != 0;
    return b;
}
static void wait_go(void) { while (!go) usleep(1000); go = 0; }
int main(void) {
    struct sigaction sa = {0};
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, 0);
    size_t n = 64 * MB / 8, w = MB / 8;
    uint64_t *a = mmap(0, 64 * MB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (a == MAP_FAILED) return 2;
    for (size_t i = 0; i < n; i++) a[i] = pat(i);
    printf("filled\n");
    fflush(stdout);
    wait_go();
    /* Every page of a is missing now. */
    if (madvise(a, 4 * MB, MADV_DONTNEED)) return 3;
    printf("dontneed: %zu nonzero words\n", nonzero(a, 4 * w));
    /* Dropped and not read until phase 2. */
    if (madvise(a + 4 * w, 2 * MB, MADV_DONTNEED)) return 3;
    void *hole = mmap(0, 8 * MB, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint64_t *m = mremap(a + 8 * w, 8 * MB, 8 * MB, MREMAP_MAYMOVE | MREMAP_FIXED, hole);
    if (m == MAP_FAILED) return 4;
    printf("mremap: %zu bad words of the first half\n", bad(m, 8 * w, 4 * w));
    if (munmap(a + 16 * w, 4 * MB)) return 5;
    uint64_t *f = mmap(a + 16 * w, 4 * MB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    if (f == MAP_FAILED) return 6;
    printf("fresh after munmap: %zu nonzero words\n", nonzero(f, 4 * w));
    fflush(stdout);
    pid_t c = fork();
    if (c == 0) {
        size_t b = bad(a + 20 * w, 20 * w, 20 * w) + nonzero(a, 4 * w) + bad(m + 4 * w, 12 * w, 3 * w);
        _exit(b ? 1 : 0);
    }
    int st = 0;
    waitpid(c, &st, 0);
    printf("child: exit %d\n", WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
    /* Split the area where nothing was read yet: copies across the new vma
       boundaries must still fill every page. */
    if (mprotect(a + 40 * w + w / 2, MB, PROT_READ)) return 7;
    /* The moved range's last MiB is not read until phase 2. */
    printf("parent: %zu bad words in 20..64 MiB, %zu in the moved second half\n",
           bad(a + 20 * w, 20 * w, 44 * w), bad(m + 4 * w, 12 * w, 3 * w));
    /* Grown (and maybe moved): the new tail is fresh memory, registered with the
       moved range; it is read only in phase 2, after every page is in. */
    uint64_t *g = mremap(m, 8 * MB, 16 * MB, MREMAP_MAYMOVE);
    if (g == MAP_FAILED) return 8;
    m = g;
    printf("phase1\n");
    fflush(stdout);
    wait_go();
    printf("after: %zu nonzero dropped, %zu bad moved, %zu nonzero grown, %zu nonzero fresh, %zu bad rest\n",
           nonzero(a, 6 * w), bad(m, 8 * w, 8 * w), nonzero(m + 8 * w, 8 * w), nonzero(f, 4 * w), bad(a + 20 * w, 20 * w, 44 * w) + bad(a + 6 * w, 6 * w, 2 * w));
    printf("done\n");
    return 0;
}
"#;

#[test]
fn fork_mremap_munmap_and_dontneed_on_missing_pages_see_the_right_contents() {
    let dir = tempdir();
    let exe = compile_c(dir.path(), "events", EVENTS_C, &["-O2"]);
    let argv = [exe.to_str().unwrap()];
    // Reference: uninterrupted, told to go twice.
    let mut p = run_prog(dir.path(), "ref", &argv);
    wait_for(&p.out, "filled", Duration::from_secs(30), "reference run");
    usr1(p.child.id() as i32);
    wait_for(&p.out, "phase1", Duration::from_secs(30), "reference run");
    usr1(p.child.id() as i32);
    assert!(p.child.wait().unwrap().success(), "reference run failed");
    let reference = std::fs::read(&p.out).unwrap();
    let reference_text = String::from_utf8_lossy(&reference).into_owned();
    assert!(
        reference_text.contains("child: exit 0")
            && reference_text
                .contains("after: 0 nonzero dropped, 0 bad moved, 0 nonzero grown, 0 nonzero fresh, 0 bad rest"),
        "the program's own checks fail even uninterrupted: {reference_text}"
    );

    let images = dir.path().join("img");
    let p = run_and_dump(dir.path(), &argv, &images);
    // Prefetch waits 8 s: the events meet missing pages.
    let t0 = Instant::now();
    let mut r = start_lazy(&images, &["--prefetch-delay-ms", "8000"]);
    usr1(r.outer_pid);
    wait_for(
        &p.out,
        "phase1",
        Duration::from_secs(30),
        "lazily restored run",
    );
    let phase1 = t0.elapsed();
    assert!(
        phase1 < Duration::from_secs(8),
        "phase 1 took {phase1:?}: the prefetch may have filled pages first, so this run proves nothing"
    );
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            r.lines.read_line(&mut line).unwrap() > 0,
            "migd restore --lazy ended before saying all pages were in"
        );
        if line.starts_with("all pages in") {
            break;
        }
    }
    println!(
        "events test: phase 1 done after {phase1:?}; {}",
        line.trim()
    );
    usr1(r.outer_pid);
    let (ok, rest, err) = r.finish();
    assert!(ok, "migd restore --lazy failed: {rest}{err}");
    let got = std::fs::read(&p.out).unwrap();
    assert_same_output("events on missing pages", &reference, &got);
}

/// A store that can fail: a FUSE file system serving the files of one directory
/// read-only, whose reads answer EIO while `fail` is set (as a store whose server
/// went away does).
struct FlakyStore {
    dir: PathBuf,
    names: Vec<String>,
    fail: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FlakyStore {
    fn attr(&self, ino: u64) -> Option<fuser::FileAttr> {
        let (kind, perm, size) = if ino == 1 {
            (fuser::FileType::Directory, 0o755, 0)
        } else {
            let name = self.names.get(ino as usize - 2)?;
            let md = std::fs::metadata(self.dir.join(name)).ok()?;
            (fuser::FileType::RegularFile, 0o644, md.len())
        };
        let t = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        Some(fuser::FileAttr {
            ino: fuser::INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind,
            perm,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        })
    }
}

impl fuser::Filesystem for FlakyStore {
    fn lookup(
        &self,
        _req: &fuser::Request,
        parent: fuser::INodeNo,
        name: &std::ffi::OsStr,
        reply: fuser::ReplyEntry,
    ) {
        let ino = self
            .names
            .iter()
            .position(|n| Some(n.as_str()) == name.to_str())
            .map(|i| i as u64 + 2);
        match (u64::from(parent), ino.and_then(|i| self.attr(i))) {
            (1, Some(a)) => reply.entry(&Duration::from_secs(1), &a, fuser::Generation(0)),
            _ => reply.error(fuser::Errno::ENOENT),
        }
    }

    fn getattr(
        &self,
        _req: &fuser::Request,
        ino: fuser::INodeNo,
        _fh: Option<fuser::FileHandle>,
        reply: fuser::ReplyAttr,
    ) {
        match self.attr(u64::from(ino)) {
            Some(a) => reply.attr(&Duration::from_secs(1), &a),
            None => reply.error(fuser::Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &fuser::Request,
        ino: fuser::INodeNo,
        _fh: fuser::FileHandle,
        offset: u64,
        size: u32,
        _flags: fuser::OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: fuser::ReplyData,
    ) {
        use std::os::unix::fs::FileExt;
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return reply.error(fuser::Errno::EIO);
        }
        let Some(name) = self.names.get(u64::from(ino) as usize - 2) else {
            return reply.error(fuser::Errno::ENOENT);
        };
        let f = match std::fs::File::open(self.dir.join(name)) {
            Ok(f) => f,
            Err(_) => return reply.error(fuser::Errno::EIO),
        };
        let mut buf = vec![0u8; size as usize];
        let mut got = 0;
        while got < buf.len() {
            match f.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(_) => return reply.error(fuser::Errno::EIO),
            }
        }
        reply.data(&buf[..got]);
    }
}

/// Mounts a [`FlakyStore`] of `dir` at `mnt`; returns the session (unmounted when
/// dropped) and the switch that makes reads fail.
fn mount_flaky(
    dir: &Path,
    mnt: &Path,
) -> (
    fuser::BackgroundSession,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    std::fs::create_dir_all(mnt).unwrap();
    let fail = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fs = FlakyStore {
        dir: dir.to_path_buf(),
        names: vec!["manifest.json".into(), "pages.img".into()],
        fail: fail.clone(),
    };
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        fuser::MountOption::FSName("flaky-store".into()),
        fuser::MountOption::RO,
    ];
    cfg.acl = fuser::SessionACL::All;
    let s = fuser::Session::new(fs, mnt, &cfg)
        .unwrap_or_else(|e| panic!("mounting the flaky store at {}: {e}", mnt.display()))
        .spawn()
        .expect("starting the flaky store");
    (s, fail)
}

#[test]
fn a_store_failing_for_seconds_makes_faults_wait_and_past_the_bound_the_loss_is_reported() {
    use std::sync::atomic::Ordering;
    let dir = tempdir();
    let exe = compile_c(dir.path(), "big", BIG_C, &["-O2"]);
    let argv = [exe.to_str().unwrap(), "128"];
    let reference = reference(dir.path(), &argv);
    let images = dir.path().join("img");
    let p = run_and_dump(dir.path(), &argv, &images);
    let filled = std::fs::read(&p.out).unwrap();
    let mnt = dir.path().join("store");
    let (session, fail) = mount_flaky(&images, &mnt);

    // 1. The store fails for 3 s while the process needs its pages: it waits, then
    //    completes with every page right.
    let r = start_lazy(&mnt, &["--no-prefetch", "--store-bound", "30"]);
    fail.store(true, Ordering::SeqCst);
    usr1(r.outer_pid);
    std::thread::sleep(Duration::from_secs(3));
    let during = std::fs::read(&p.out).unwrap();
    assert!(
        alive(r.outer_pid),
        "the process died while the store was failing"
    );
    assert!(
        reference.starts_with(&during) && !String::from_utf8_lossy(&during).contains("done"),
        "while the store failed, the process went on or wrote something else: {:?}",
        String::from_utf8_lossy(&during[filled.len().min(during.len())..])
    );
    fail.store(false, Ordering::SeqCst);
    let (ok, rest, err) = r.finish();
    assert!(
        ok,
        "migd restore --lazy failed after the store came back: {rest}{err}"
    );
    assert_same_output(
        "lazy restore across a 3 s store failure",
        &reference,
        &std::fs::read(&p.out).unwrap(),
    );

    // 2. The store stays down past --store-bound: the process is killed and the loss
    //    is reported, naming pages.img and the bytes never restored.
    std::fs::write(&p.out, &filled).unwrap();
    let r = start_lazy(&mnt, &["--no-prefetch", "--store-bound", "2"]);
    let pid = r.outer_pid;
    fail.store(true, Ordering::SeqCst);
    usr1(pid);
    let t0 = Instant::now();
    let (ok, rest, err) = r.finish();
    let took = t0.elapsed();
    fail.store(false, Ordering::SeqCst);
    println!("store lost after {took:?}: {}", err.trim());
    assert!(
        !ok,
        "migd restore --lazy succeeded with the store down: {rest}"
    );
    assert!(
        err.contains("pages.img") && err.contains("bytes of its memory were never restored"),
        "the loss is not reported clearly: {err}"
    );
    assert!(
        !alive(pid),
        "the process {pid} still runs with pages missing"
    );
    let after = std::fs::read(&p.out).unwrap();
    assert!(
        reference.starts_with(&after) && !String::from_utf8_lossy(&after).contains("done"),
        "the process wrote something else before it was killed"
    );
    drop(session);
}

/// Runs `migd internal-lazy-resume` for a lazily restored process whose server died.
fn resume(stub: i32, fd: i32, images: &Path) -> std::process::Output {
    Command::new(migd())
        .args([
            "internal-lazy-resume",
            "--stub",
            &stub.to_string(),
            "--fd",
            &fd.to_string(),
            "--images",
        ])
        .arg(images)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

/// Waits until `pid` is gone (its namespace's stub, our process's parent now being
/// init, reaps it).
fn wait_gone(pid: i32, limit: Duration) -> bool {
    let t0 = Instant::now();
    while alive(pid) {
        if t0.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

#[test]
fn killing_the_server_mid_fault_in_leaves_the_process_waiting_and_a_resumed_server_completes_it() {
    let dir = tempdir();
    let exe = compile_c(dir.path(), "big", BIG_C, &["-O2"]);
    // 64 groups of 16 MiB, 100 ms apart: the server dies while pages are missing.
    let argv = [exe.to_str().unwrap(), "1024", "100"];
    let reference = reference(dir.path(), &argv);
    let images = dir.path().join("img");
    let p = run_and_dump(dir.path(), &argv, &images);
    let mut r = start_lazy(&images, &["--no-prefetch"]);
    let (pid, stub, fd) = (r.outer_pid, r.stub_pid, r.uffd_fd);
    usr1(pid);
    wait_for(
        &p.out,
        "group 3 ",
        Duration::from_secs(30),
        "lazily restored run",
    );
    r.child.kill().unwrap();
    let _ = r.child.wait();
    std::thread::sleep(Duration::from_secs(2));
    let during = std::fs::read(&p.out).unwrap();
    let text = String::from_utf8_lossy(&during).into_owned();
    assert!(
        alive(pid),
        "the process died when its server was killed: {text}"
    );
    assert!(
        reference.starts_with(&during) && !text.contains("done"),
        "without a server the process went on or read wrong pages: {text}"
    );
    let groups = text.matches("group ").count();
    assert!(
        groups < 64,
        "the process did not wait for its missing pages ({groups} groups checked)"
    );
    let o = resume(stub, fd, &images);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    println!(
        "resumed after {groups} of 64 groups: {}",
        out.lines().last().unwrap_or("")
    );
    assert!(
        o.status.success(),
        "migd internal-lazy-resume failed: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        wait_gone(pid, Duration::from_secs(60)),
        "the process did not end after the resume"
    );
    assert_same_output(
        "lazy restore served by a resumed server",
        &reference,
        &std::fs::read(&p.out).unwrap(),
    );
}

#[test]
fn a_resumed_server_knows_the_layout_changes_the_dead_one_was_told_of() {
    let dir = tempdir();
    let exe = compile_c(dir.path(), "events", EVENTS_C, &["-O2"]);
    let argv = [exe.to_str().unwrap()];
    let mut p = run_prog(dir.path(), "ref", &argv);
    wait_for(&p.out, "filled", Duration::from_secs(30), "reference run");
    usr1(p.child.id() as i32);
    wait_for(&p.out, "phase1", Duration::from_secs(30), "reference run");
    usr1(p.child.id() as i32);
    assert!(p.child.wait().unwrap().success(), "reference run failed");
    let reference = std::fs::read(&p.out).unwrap();

    let images = dir.path().join("img");
    let p = run_and_dump(dir.path(), &argv, &images);
    // No prefetch before the server dies: the events of phase 1 (drop, move, unmap,
    // fork) meet missing pages, and phase 2 reads pages they concern that nobody
    // touched yet.
    let mut r = start_lazy(&images, &["--prefetch-delay-ms", "600000"]);
    let (pid, stub, fd) = (r.outer_pid, r.stub_pid, r.uffd_fd);
    usr1(pid);
    wait_for(
        &p.out,
        "phase1",
        Duration::from_secs(30),
        "lazily restored run",
    );
    r.child.kill().unwrap();
    let _ = r.child.wait();
    let o = Command::new(migd())
        .args([
            "internal-lazy-resume",
            "--stub",
            &stub.to_string(),
            "--fd",
            &fd.to_string(),
            "--images",
        ])
        .arg(&images)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    usr1(pid);
    let o = o.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    println!(
        "resumed after the events: {}",
        out.lines().last().unwrap_or("")
    );
    assert!(
        o.status.success(),
        "migd internal-lazy-resume failed: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        wait_gone(pid, Duration::from_secs(60)),
        "the process did not end after the resume"
    );
    assert_same_output(
        "events, then a resumed server",
        &reference,
        &std::fs::read(&p.out).unwrap(),
    );
}

#[test]
fn a_pre_copy_image_restores_lazily_with_every_page_right() {
    // Pre-copy images point runs at the latest copy of each page, anywhere in
    // pages.img (offsets need not increase): the pager follows the runs.
    let dir = tempdir();
    let exe = compile_c(dir.path(), "big", BIG_C, &["-O2"]);
    let argv = [exe.to_str().unwrap(), "256"];
    let reference = reference(dir.path(), &argv);
    let images = dir.path().join("img");
    let mut p = started(dir.path(), &argv);
    let o = Command::new(migd())
        .args([
            "dump",
            "--precopy",
            "--pid",
            &p.child.id().to_string(),
            "--images",
        ])
        .arg(&images)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "migd dump --precopy failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let _ = p.child.wait();
    let (all_in, verify) = lazy_round(&images, &p.out, &p.err, &reference, &[]);
    println!("pre-copy image, lazy: {all_in} | program: {verify}");
}

/// Fills `MiB` MiB with a pattern, says `filled`; on SIGUSR1 reads its last MiB and
/// prints its checksum (`last ...`); on SIGUSR2 checks every word, prints `bad N`
/// and `done`.
const LAST_FIRST_C: &str = r#"
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <signal.h>
#include <unistd.h>
#include <sys/mman.h>
static volatile sig_atomic_t step;
static void on_sig(int s) { step = s == SIGUSR1 ? 1 : 2; }
static inline uint64_t pat(uint64_t i) { return (i * 0x9E3779B97F4A7C15ULL) ^ (i >> 7) ^ 0x1234567ULL; }
int main(int argc, char **argv) {
    size_t n = (strtoull(argv[1], 0, 10) << 20) / 8, mib = 1 << 17;
    struct sigaction sa = {0};
    sa.sa_handler = on_sig;
    sigaction(SIGUSR1, &sa, 0);
    sigaction(SIGUSR2, &sa, 0);
    uint64_t *b = mmap(0, n * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (b == MAP_FAILED) return 2;
    for (size_t i = 0; i < n; i++) b[i] = pat(i);
    printf("filled\n");
    fflush(stdout);
    while (step != 1) usleep(1000);
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = n - mib; i < n; i++) h = (h ^ b[i]) * 1099511628211ULL;
    printf("last %016llx\n", (unsigned long long)h);
    fflush(stdout);
    while (step != 2) usleep(1000);
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) if (b[i] != pat(i)) bad++;
    printf("bad %zu\ndone\n", bad);
    return bad != 0;
}
"#;

fn ready_chunks(images: &Path) -> u64 {
    std::fs::metadata(images.join("late.ready")).map_or(0, |m| m.len() / 8)
}

#[test]
fn late_pages_the_process_faults_on_are_written_first_and_every_page_arrives_intact() {
    use migd::engine::handoff::dump_frozen;
    use migd::engine::late::{FlushEnd, LateOptions};
    let dir = tempdir();
    let exe = compile_c(dir.path(), "lastfirst", LAST_FIRST_C, &["-O2"]);
    let argv = [exe.to_str().unwrap(), "64"];
    let images = dir.path().join("img");
    let mut p = started(dir.path(), &argv);
    // Frozen and held here; pages nobody asks for are held back (as while a
    // migration's destination restores) until released below, so that only wanted
    // chunks can be in when the program reads its end.
    let mut held = dump_frozen(
        p.child.id() as i32,
        &images,
        Some(LateOptions {
            held: true,
            ..LateOptions::bound(Duration::from_secs(60))
        }),
    )
    .expect("lazy dump with late pages");
    held.checked().expect("the image is whole and faithful");
    assert!(
        held.late_bytes >= 63 << 20,
        "nearly all of the 64 MiB buffer is left for after the freeze, not {} bytes",
        held.late_bytes
    );
    let chunks = held.late_bytes.div_ceil(1 << 20);
    let r = start_lazy(&images, &["--no-prefetch"]);
    usr1(r.outer_pid);
    let restored_out = p.out.clone();
    wait_for(
        &restored_out,
        "last ",
        Duration::from_secs(30),
        "the program reading its last MiB",
    );
    let ready = ready_chunks(&images);
    assert!(
        ready <= 4,
        "the program read its last MiB while the source had written only the chunks asked \
         for ({ready} of {chunks} listed in late.ready)"
    );
    // Held back, nothing else is written while nobody asks; released, the rest is.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        ready_chunks(&images),
        ready,
        "chunks nobody asked for were written while the flush was held"
    );
    held.release_late();
    let t0 = Instant::now();
    while ready_chunks(&images) < chunks {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "released, the flush did not write the other chunks ({} of {chunks} listed)",
            ready_chunks(&images)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(Command::new("kill")
        .args(["-USR2", &r.outer_pid.to_string()])
        .status()
        .unwrap()
        .success());
    let (ok, rest, stderr) = r.finish();
    assert!(ok, "migd restore --lazy failed: {rest}{stderr}");
    let out = std::fs::read_to_string(&restored_out).unwrap();
    assert!(out.contains("bad 0\ndone"), "every word intact: {out}");
    match held.wait_flushed() {
        Some(FlushEnd::Done { bytes, .. }) => assert_eq!(bytes, held.late_bytes),
        Some(FlushEnd::NotNeeded { .. }) => {}
        other => panic!("the flush ended as {other:?}"),
    }
    held.kill();
    let _ = p.child.wait();
    // The reference: the same program's last-MiB checksum, uninterrupted.
    assert_same_output(
        "late pages",
        &last_first_reference(dir.path(), &argv),
        out.as_bytes(),
    );
}

/// [`LAST_FIRST_C`] run uninterrupted (told to go on at each step); its output.
fn last_first_reference(dir: &Path, argv: &[&str]) -> Vec<u8> {
    let mut q = run_prog(dir, "ref", argv);
    wait_for(&q.out, "filled", Duration::from_secs(60), "reference run");
    usr1(q.child.id() as i32);
    wait_for(&q.out, "last ", Duration::from_secs(30), "reference run");
    let _ = Command::new("kill")
        .args(["-USR2", &q.child.id().to_string()])
        .status();
    assert!(q.child.wait().unwrap().success());
    std::fs::read(&q.out).unwrap()
}

/// `migd restore --lazy` of `images` with `extra`, expected to refuse; its stderr.
fn lazy_refused(images: &Path, extra: &[&str]) -> String {
    let o = Command::new(migd())
        .args(["restore", "--lazy", "--images"])
        .arg(images)
        .args(extra)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        !o.status.success() && !out.contains("restored pid"),
        "the restore should have been refused: {out}"
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn eager_pages_handed_over_stand_in_for_pages_img_and_damage_is_refused() {
    use migd::engine::handoff::dump_frozen;
    use migd::engine::image::{read_manifest, EagerPages};
    use migd::engine::late::LateOptions;
    let dir = tempdir();
    let exe = compile_c(dir.path(), "lastfirst", LAST_FIRST_C, &["-O2"]);
    let argv = [exe.to_str().unwrap(), "16"];
    let expected = last_first_reference(dir.path(), &argv);
    let images = dir.path().join("img");
    let mut p = started(dir.path(), &argv);
    let mut held = dump_frozen(
        p.child.id() as i32,
        &images,
        Some(LateOptions::bound(Duration::from_secs(60))),
    )
    .expect("lazy dump with late pages");
    held.checked().expect("the image is whole and faithful");
    let bytes = held
        .eager
        .clone()
        .expect("a lazy dump hands its eager pages over");
    let eager = EagerPages::from_bytes(&images, &bytes).expect("they decode");
    // They are what pages.img holds there (pages.img of a dump with late pages
    // holds only what the restore fills before the process runs).
    let pages_path = images.join("pages.img");
    let pages = std::fs::read(&pages_path).unwrap();
    let m = read_manifest(&images).unwrap();
    assert_eq!(pages.len() as u64, m.pages_len);
    assert!(
        eager.data.len() >= 64 << 10,
        "at least the stack's window is handed over, not {} bytes",
        eager.data.len()
    );
    for (off, b) in eager.iter() {
        assert_eq!(
            &pages[off as usize..off as usize + b.len()],
            b,
            "the handed-over range at {off} differs from pages.img"
        );
    }
    // pages.img zeroed: a restore without the handover is refused (its chunks'
    // CRCs), one with it does not read pages.img at all.
    std::fs::write(&pages_path, vec![0u8; pages.len()]).unwrap();
    let err = lazy_refused(&images, &[]);
    assert!(
        err.contains("checksum"),
        "zeroed pages.img not refused: {err}"
    );
    let given = dir.path().join("eager.bin");
    let mut damaged = bytes.clone();
    let mid = damaged.len() / 2;
    damaged[mid] ^= 0x40;
    std::fs::write(&given, &damaged).unwrap();
    let err = lazy_refused(&images, &["--eager", given.to_str().unwrap()]);
    assert!(
        err.contains("eager pages handed over"),
        "damaged handover not named: {err}"
    );
    std::fs::write(&given, &bytes).unwrap();
    let r = start_lazy(&images, &["--eager", given.to_str().unwrap()]);
    usr1(r.outer_pid);
    wait_for(
        &p.out,
        "last ",
        Duration::from_secs(30),
        "the restored program",
    );
    assert!(Command::new("kill")
        .args(["-USR2", &r.outer_pid.to_string()])
        .status()
        .unwrap()
        .success());
    let (ok, rest, stderr) = r.finish();
    assert!(ok, "migd restore --lazy --eager failed: {rest}{stderr}");
    let _ = held.wait_flushed();
    held.kill();
    let _ = p.child.wait();
    assert_same_output(
        "restored from handed-over eager pages",
        &expected,
        &std::fs::read(&p.out).unwrap(),
    );
}
