//! Helpers for the engine's acceptance tests: compile C workloads, run a workload
//! uninterrupted for a reference output, and run it again while dumping and restoring
//! it several times, as root, with real processes.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub fn migd() -> &'static str {
    env!("CARGO_BIN_EXE_migd")
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("migd-test-")
        .tempdir()
        .expect("creating a temp dir")
}

/// Writes `src` to `dir/name.c` and compiles it with `cc` (extra flags appended).
pub fn compile_c(dir: &Path, name: &str, src: &str, flags: &[&str]) -> PathBuf {
    let c = dir.join(format!("{name}.c"));
    std::fs::write(&c, src).unwrap();
    let exe = dir.join(name);
    let out = Command::new("cc")
        .arg("-O1")
        .arg("-o")
        .arg(&exe)
        .arg(&c)
        .args(flags)
        .output()
        .expect("running cc");
    assert!(
        out.status.success(),
        "cc failed for {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// A command to run as the workload process itself (no shell in between).
#[derive(Clone)]
pub struct Workload {
    pub argv: Vec<String>,
    pub cwd: PathBuf,
    pub stdin: Option<PathBuf>,
}

impl Workload {
    pub fn new(cwd: &Path, argv: &[&str]) -> Workload {
        Workload {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            cwd: cwd.to_path_buf(),
            stdin: None,
        }
    }

    fn spawn(&self, out: &Path) -> Child {
        let f = std::fs::File::create(out).unwrap();
        let stdin = match &self.stdin {
            Some(p) => Stdio::from(std::fs::File::open(p).unwrap()),
            None => Stdio::null(),
        };
        Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .current_dir(&self.cwd)
            .stdin(stdin)
            .stdout(f)
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {:?}: {e}", self.argv))
    }

    /// Runs to completion; returns the output.
    pub fn reference(&self, out: &Path) -> Vec<u8> {
        let st = self.spawn(out).wait().unwrap();
        assert!(
            st.success(),
            "reference run of {:?} failed: {st}",
            self.argv
        );
        std::fs::read(out).unwrap()
    }

    /// Runs while dumping and restoring it after each delay; returns the output.
    pub fn migrated(&self, out: &Path, images: &Path, delays: &[Duration]) -> Vec<u8> {
        let mut child = self.spawn(out);
        let mut pid = child.id() as i32;
        let mut restorers: Vec<Child> = Vec::new();
        for (i, d) in delays.iter().enumerate() {
            std::thread::sleep(*d);
            let dir = images.join(format!("dump{i}"));
            let o = Command::new(migd())
                .args(["dump", "--pid", &pid.to_string(), "--images"])
                .arg(&dir)
                .env("RUST_BACKTRACE", "0")
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "dump {i} of {:?} (pid {pid}) failed: {}{}",
                self.argv,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            if i == 0 {
                let _ = child.wait();
            }
            let (r, new_pid) = start_restore(&dir);
            restorers.push(r);
            pid = new_pid;
        }
        let _ = child.wait();
        let last = restorers.pop().expect("at least one dump");
        let o = last.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "the restored {:?} did not exit cleanly: {} ({})",
            self.argv,
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        for mut r in restorers {
            let _ = r.wait();
        }
        std::fs::read(out).unwrap()
    }
}

/// Runs `migd dump --pid PID --images DIR` (the process is killed after the dump);
/// panics with `what` and migd's stderr unless it succeeds.
pub fn dump_ok(pid: &str, images: &Path, what: &str) {
    let o = Command::new(migd())
        .args(["dump", "--pid", pid, "--images"])
        .arg(images)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Starts `migd restore` (without --detach); returns it and the restored process's pid
/// as this namespace sees it.
pub fn start_restore(dir: &Path) -> (Child, i32) {
    let mut r = Command::new(migd())
        .args(["restore", "--images"])
        .arg(dir)
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(r.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let pid = line
        .split("(pid ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok());
    match pid {
        Some(p) => (r, p),
        None => {
            let o = r.wait_with_output().unwrap();
            panic!(
                "restore from {} failed: {line}{}",
                dir.display(),
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
}

/// Asserts that two outputs are identical, showing where they first differ.
pub fn assert_same_output(what: &str, reference: &[u8], got: &[u8]) {
    if reference == got {
        return;
    }
    let at = reference
        .iter()
        .zip(got)
        .position(|(a, b)| a != b)
        .unwrap_or(reference.len().min(got.len()));
    let lo = at.saturating_sub(80);
    panic!(
        "{what}: output differs from the uninterrupted run at byte {at} (reference {} bytes, migrated {} bytes)\nreference: {:?}\nmigrated:  {:?}",
        reference.len(),
        got.len(),
        String::from_utf8_lossy(&reference[lo..(at + 80).min(reference.len())]),
        String::from_utf8_lossy(&got[lo.min(got.len())..(at + 80).min(got.len())])
    );
}

/// Reference run, then a migrated run with three dumps; outputs must match.
pub fn check_workload(what: &str, w: &Workload, delays: &[Duration]) {
    let dir = tempdir();
    let reference = w.reference(&dir.path().join("ref.out"));
    let got = w.migrated(&dir.path().join("mig.out"), dir.path(), delays);
    assert_same_output(what, &reference, &got);
}

pub fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// Writes `bytes` of deterministic text lines ("<number> <letters>\n") to `path`.
pub fn gen_text(path: &Path, bytes: u64, seed: u64) {
    use std::io::Write;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    let mut x = seed | 1;
    let mut written = 0u64;
    let mut line = String::new();
    while written < bytes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        line.clear();
        line.push_str(&(x % 1_000_000_007).to_string());
        line.push(' ');
        for i in 0..(x >> 40) % 40 {
            line.push((b'a' + ((x >> (i % 50)) % 26) as u8) as char);
        }
        line.push('\n');
        w.write_all(line.as_bytes()).unwrap();
        written += line.len() as u64;
    }
    w.flush().unwrap();
}

/// Writes `bytes` of deterministic binary data to `path` (fast).
pub fn gen_binary(path: &Path, bytes: u64, seed: u64) {
    use std::io::Write;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    let mut x = seed | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        for c in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_ne_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        w.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    w.flush().unwrap();
}
