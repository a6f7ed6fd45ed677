//! A C program using eventfd, signalfd, timerfd, epoll, a deleted-but-open file, a
//! memfd mapping, shared anonymous memory, a FIFO and a pipe is dumped and restored
//! three times; its output must equal an uninterrupted run's (epoll_wait must not
//! see a spurious EINTR from the freeze); and POSIX timers.

mod common;
use common::*;

const KINDS_C: &str = r#"
#define _GNU_SOURCE
#include <stdio.h>
#include <stdint.h>
#include <string.h>
#include <signal.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/stat.h>
int main(void) {
    int efd = eventfd(3, EFD_NONBLOCK);
    sigset_t ss; sigemptyset(&ss); sigaddset(&ss, SIGUSR1); sigprocmask(SIG_BLOCK, &ss, 0);
    int sfd = signalfd(-1, &ss, 0);
    int tfd = timerfd_create(CLOCK_MONOTONIC, 0);
    struct itimerspec its = {{0, 10000000}, {0, 10000000}};
    timerfd_settime(tfd, 0, &its, 0);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 0x1234};
    epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &ev);
    int del = open("gone.dat", O_RDWR | O_CREAT | O_TRUNC, 0600);
    unlink("gone.dat");
    int mfd = memfd_create("kinds", 0);
    ftruncate(mfd, 1 << 20);
    uint8_t *mm = mmap(0, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    uint8_t *sh = mmap(0, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    int p[2]; pipe(p);
    mkfifo("f.fifo", 0600);
    int ff = open("f.fifo", O_RDWR);
    uint64_t h = 5381;
    for (int i = 0; i < 300; i++) {
        struct epoll_event got;
        int n = epoll_wait(ep, &got, 1, -1);
        if (n != 1 || got.data.u64 != 0x1234) { printf("epoll %d\n", n); return 1; }
        uint64_t ticks; read(tfd, &ticks, 8);
        uint64_t one = 1; write(efd, &one, 8);
        kill(getpid(), SIGUSR1);
        struct signalfd_siginfo si; read(sfd, &si, sizeof si);
        char rec[32]; int len = snprintf(rec, sizeof rec, "r%d;", i);
        write(del, rec, len);
        mm[(i * 4099) % (1 << 20)] += i; { uint8_t c = 0; pread(mfd, &c, 1, (i * 4099) % (1 << 20)); if (c != mm[(i * 4099) % (1 << 20)]) { printf("memfd incoherent at %d\n", i); return 1; } } sh[(i * 7919) % (1 << 20)] += i;
        write(p[1], rec, len); char back[32]; read(p[0], back, len);
        write(ff, rec, len); char fb[32]; read(ff, fb, len); if (memcmp(fb, rec, len)) { printf("fifo\n"); return 1; }
        h = h * 33 + si.ssi_signo + (uint64_t)mm[(i * 4099) % (1 << 20)] + sh[(i * 7919) % (1 << 20)] + (uint8_t)back[1];
        if (i % 10 == 0) printf("%d %016llx\n", i, (unsigned long long)h);
    }
    uint64_t cnt = 0; read(efd, &cnt, 8);
    off_t end = lseek(del, 0, SEEK_CUR);
    char buf[8192]; pread(del, buf, end, 0);
    uint64_t fh = 0; for (off_t k = 0; k < end; k++) fh = fh * 131 + (uint8_t)buf[k];
    printf("eventfd %llu deleted-file %lld %016llx\n", (unsigned long long)cnt, (long long)end, (unsigned long long)fh);
    return 0;
}
"#;

#[test]
fn c_program_with_eventfd_signalfd_timerfd_epoll_deleted_file_fifo_and_memfd_survives_three_dumps()
{
    let dir = tempdir();
    let exe = compile_c(dir.path(), "kinds", KINDS_C, &[]);
    let w = Workload::new(dir.path(), &[exe.to_str().unwrap()]);
    check_workload("fd kinds", &w, &[ms(600), ms(600), ms(600)]);
}

const TIMER_C: &str = r#"
#include <stdio.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>
static volatile int n;
static void h(int s) { (void)s; n++; }
int main(void) {
    signal(SIGUSR2, h);
    timer_t t, t2;
    struct sigevent sev = {.sigev_notify = SIGEV_SIGNAL, .sigev_signo = SIGUSR2, .sigev_value.sival_ptr = (void*)0x1234};
    timer_create(CLOCK_MONOTONIC, &sev, &t);
    struct sigevent sev2 = {.sigev_notify = SIGEV_NONE};
    timer_create(CLOCK_REALTIME, &sev2, &t2);
    struct itimerspec its = {{0, 10000000}, {0, 10000000}};
    timer_settime(t, 0, &its, 0);
    struct itimerspec its2 = {{5, 0}, {100, 0}};
    timer_settime(t2, 0, &its2, 0);
    /* Each step needs one more timer signal: a lost timer hangs the program. */
    for (int i = 0; i < 300; i++) { int last = n; while (n == last) pause(); if (i % 20 == 0) printf("%d\n", i); }
    struct itimerspec g; timer_gettime(t2, &g);
    printf("t2 interval %ld armed %d ids %ld %ld\n", (long)g.it_interval.tv_sec, g.it_value.tv_sec > 50, (long)t, (long)t2);
    return 0;
}
"#;

#[test]
fn posix_timers_keep_their_ids_and_settings_across_three_dumps() {
    let dir = tempdir();
    let exe = compile_c(dir.path(), "ptimer", TIMER_C, &[]);
    let w = Workload::new(dir.path(), &[exe.to_str().unwrap()]);
    check_workload("POSIX timers", &w, &[ms(500), ms(600), ms(600)]);
}

/// Writes bytes into a FIFO it holds O_RDWR, sleeps through the dumps (more bytes
/// go in between), then drains the FIFO without blocking and prints what it got.
const FIFO_DATA_C: &str = r#"
#include <stdio.h>
#include <string.h>
#include <errno.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/stat.h>
static void nap(void) { struct timespec ts = {0, 50000000}; while (nanosleep(&ts, &ts) && errno == EINTR) ; }
static int put(int fd, int tag, int len) {
    char buf[8192];
    for (int k = 0; k < len; k++) buf[k] = (char)('a' + (tag * 7 + k * 13) % 26);
    buf[len - 1] = '\n';
    return write(fd, buf, len) == len;
}
int main(void) {
    if (mkfifo("d.fifo", 0600) && errno != EEXIST) { printf("mkfifo %d\n", errno); return 1; }
    int ff = open("d.fifo", O_RDWR);
    if (ff < 0 || !put(ff, 1, 5000)) { printf("first write\n"); return 1; }
    for (int i = 0; i < 40; i++) {
        nap();
        if (i == 12 && !put(ff, 2, 3000)) { printf("second write\n"); return 1; }
        if (i % 5 == 0) printf("step %d\n", i);
    }
    fflush(stdout);
    fcntl(ff, F_SETFL, O_NONBLOCK);
    char buf[4096]; long total = 0; ssize_t n;
    while ((n = read(ff, buf, sizeof buf)) > 0) { fwrite(buf, 1, n, stdout); total += n; }
    printf("read %ld bytes, then %s\n", total, n < 0 && errno == EAGAIN ? "EAGAIN" : "other");
    return 0;
}
"#;

#[test]
fn fifo_buffered_data_survives_two_dumps() {
    let dir = tempdir();
    let exe = compile_c(dir.path(), "fifodata", FIFO_DATA_C, &[]);
    let w = Workload::new(dir.path(), &[exe.to_str().unwrap()]);
    check_workload("FIFO data", &w, &[ms(300), ms(700)]);
}

#[test]
fn fifo_data_is_not_duplicated_when_another_process_keeps_the_fifo_open() {
    let dir = tempdir();
    let exe = compile_c(dir.path(), "fifodata", FIFO_DATA_C, &[]);
    let fifo = dir.path().join("d.fifo");
    let st = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(st.success(), "mkfifo failed");
    // The test holds the FIFO open, so the kernel object (and its buffered bytes)
    // outlives each dumped process: restore must not write them a second time.
    let _keep = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    let w = Workload::new(dir.path(), &[exe.to_str().unwrap()]);
    check_workload("FIFO data kept by another process", &w, &[ms(300), ms(700)]);
}
