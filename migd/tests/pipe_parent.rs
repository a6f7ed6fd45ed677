//! A C program reading a pipe fed by its parent (this test) is dumped and restored
//! three times; each restore hands the same pipe back with `--inherit-fd`, the parent
//! keeps writing, and the output must equal an uninterrupted run's.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::process::{Child, Command, Stdio};

const READER_C: &str = r#"
#include <stdio.h>
#include <stdint.h>
#include <string.h>
int main(void) {
    char line[256];
    uint64_t h = 14695981039346656037ull;
    int n = 0;
    while (fgets(line, sizeof line, stdin)) {
        for (char *p = line; *p; p++) { h ^= (uint8_t)*p; h *= 1099511628211ull; }
        if (++n % 50 == 0) printf("%d %016llx\n", n, (unsigned long long)h);
    }
    printf("eof after %d lines %016llx\n", n, (unsigned long long)h);
    return 0;
}
"#;

fn feeder(w: OwnedFd) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut f = std::fs::File::from(w);
        for i in 0..3000 {
            writeln!(f, "line {i} {}", "x".repeat(i % 61)).unwrap();
            if i % 10 == 0 {
                std::thread::sleep(ms(8));
            }
        }
    })
}

fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap()
}

fn run(exe: &std::path::Path, r: &OwnedFd, out: &std::path::Path) -> Child {
    Command::new(exe)
        .stdin(Stdio::from(r.try_clone().unwrap()))
        .stdout(std::fs::File::create(out).unwrap())
        .spawn()
        .unwrap()
}

#[test]
fn c_program_reading_a_pipe_fed_by_its_parent_survives_three_dumps() {
    let dir = tempdir();
    let exe = compile_c(dir.path(), "reader", READER_C, &[]);

    let (r, w) = pipe();
    let ref_out = dir.path().join("ref.out");
    let mut c = run(&exe, &r, &ref_out);
    drop(r);
    feeder(w).join().unwrap();
    assert!(c.wait().unwrap().success(), "reference reader failed");
    let reference = std::fs::read(&ref_out).unwrap();

    let (r, w) = pipe();
    let key = format!(
        "0:pipe:[{}]",
        std::fs::metadata(format!("/proc/self/fd/{}", r.as_raw_fd()))
            .unwrap()
            .ino()
    );
    let out = dir.path().join("mig.out");
    let mut first = run(&exe, &r, &out);
    let feed = feeder(w);
    let mut pid = first.id() as i32;
    let mut restorers: Vec<Child> = Vec::new();
    for i in 0..3 {
        std::thread::sleep(ms(500));
        let img = dir.path().join(format!("img{i}"));
        let o = Command::new(migd())
            .args(["dump", "--pid", &pid.to_string(), "--images"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "dump {i} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let _ = first.try_wait();
        let mut rest = Command::new(migd())
            .args(["restore", "--inherit-fd", &key, "--images"])
            .arg(&img)
            .stdin(Stdio::from(r.try_clone().unwrap()))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(rest.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        pid = match line
            .split("(pid ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse().ok())
        {
            Some(p) => p,
            None => panic!(
                "restore {i} failed: {line}{}",
                String::from_utf8_lossy(&rest.wait_with_output().unwrap().stderr)
            ),
        };
        restorers.push(rest);
    }
    drop(r);
    feed.join().unwrap();
    let _ = first.wait();
    let last = restorers.pop().unwrap().wait_with_output().unwrap();
    assert!(
        last.status.success(),
        "restored reader failed: {}",
        String::from_utf8_lossy(&last.stderr)
    );
    for mut x in restorers {
        let _ = x.wait();
    }
    assert_same_output("pipe reader", &reference, &std::fs::read(&out).unwrap());
}
