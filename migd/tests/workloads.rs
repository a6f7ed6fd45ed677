//! Real programs dumped and restored three times during their run; each one's output
//! must be byte-identical to an uninterrupted run's.

mod common;
use common::*;

/// Four worker threads with a mutex and a condition variable (shared with the
/// cluster tests).
const THREADS_C: &str = include_str!("../../tests/programs/threads.c");

#[test]
fn c_four_threads_with_mutexes_and_condvars_survive_three_dumps() {
    let dir = tempdir();
    // N=2000 rounds: ~5 s alone here, so that the third dump (1.3 s of delays plus
    // three dumps and restores in) finds it still running on a quiet machine too
    // (the default 600 ran out first in one run of three).
    let exe = compile_c(dir.path(), "threads", THREADS_C, &["-pthread", "-DN=2000"]);
    let w = Workload::new(dir.path(), &[exe.to_str().unwrap()]);
    check_workload("C four threads", &w, &[ms(500), ms(400), ms(400)]);
}

/// Two python threads (shared with the cluster tests; N from argv).
const PY_THREADS: &str = include_str!("../../tests/programs/two_threads.py");

#[test]
fn python3_running_two_threads_survives_three_dumps() {
    let dir = tempdir();
    std::fs::write(dir.path().join("two.py"), PY_THREADS).unwrap();
    // 15M: ~4.7 s alone here; 5M (1.5 s) ran out before the third dump in one run of
    // four on a quiet machine.
    let w = Workload::new(dir.path(), &["/usr/bin/python3", "two.py", "15000000"]);
    check_workload("python3 two threads", &w, &[ms(300), ms(300), ms(300)]);
}

#[test]
fn perl_loop_survives_three_dumps() {
    let dir = tempdir();
    let prog = r#"$| = 1; my $s = 0; for my $i (0..40000000) { $s = ($s * 31 + $i) % 1000003; print "$i $s\n" if $i % 10000 == 0 }"#;
    let w = Workload::new(dir.path(), &["/usr/bin/perl", "-e", prog]);
    check_workload("perl", &w, &[ms(300), ms(300), ms(300)]);
}

#[test]
fn bash_loop_survives_three_dumps() {
    let dir = tempdir();
    let prog = "i=0; s=0; while [ $i -lt 400000 ]; do s=$(( (s*31+i) % 1000003 )); if [ $((i%1000)) = 0 ]; then echo $i $s; fi; i=$((i+1)); done";
    let w = Workload::new(dir.path(), &["/bin/bash", "-c", prog]);
    check_workload("bash loop", &w, &[ms(400), ms(400), ms(400)]);
}

#[test]
fn sha256sum_of_a_1gib_file_survives_three_dumps() {
    let dir = tempdir();
    gen_binary(&dir.path().join("big"), 1 << 30, 7);
    let w = Workload::new(dir.path(), &["/usr/bin/sha256sum", "big"]);
    check_workload("sha256sum 1 GiB", &w, &[ms(300), ms(300), ms(300)]);
}

#[test]
fn sort_of_a_200mb_file_survives_three_dumps() {
    let dir = tempdir();
    gen_text(&dir.path().join("in.txt"), 200 << 20, 11);
    let w = Workload::new(dir.path(), &["/usr/bin/sort", "in.txt"]);
    check_workload("sort 200 MB", &w, &[ms(800), ms(800), ms(800)]);
}

#[test]
fn xz_with_two_threads_survives_three_dumps() {
    let dir = tempdir();
    gen_text(&dir.path().join("in.txt"), 24 << 20, 13);
    let w = Workload::new(dir.path(), &["/usr/bin/xz", "-T2", "-3", "-c", "in.txt"]);
    check_workload("xz -T2", &w, &[ms(700), ms(700), ms(700)]);
}

#[test]
fn bc_computing_pi_survives_three_dumps() {
    let dir = tempdir();
    std::fs::write(dir.path().join("pi.bc"), "scale=2500; 4*a(1)\n").unwrap();
    let w = Workload::new(dir.path(), &["/usr/bin/bc", "-l", "pi.bc"]);
    check_workload("bc pi", &w, &[ms(300), ms(300), ms(300)]);
}
