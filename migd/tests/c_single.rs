//! A single-threaded C program with a SIGALRM handler driven by setitimer is dumped
//! and restored three times during its run; its output must equal an uninterrupted run.

mod common;
use common::*;

const ALARM_C: &str = r#"
#include <stdio.h>
#include <signal.h>
#include <sys/time.h>
#include <unistd.h>
#include <stdint.h>
static volatile sig_atomic_t ticks;
static void on_alarm(int s) { (void)s; ticks++; }
int main(void) {
    struct sigaction sa = {0};
    sa.sa_handler = on_alarm;
    sigaction(SIGALRM, &sa, 0);
    struct itimerval it = {{0, 10000}, {0, 10000}};
    setitimer(ITIMER_REAL, &it, 0);
    uint64_t h = 1469598103934665603ULL;
    for (int i = 0; i < 300; i++) {
        for (int k = 0; k < 20000; k++) { h ^= (uint64_t)(i * 31 + k); h *= 1099511628211ULL; }
        printf("%d %016llx\n", i, (unsigned long long)h);
        int last = ticks;
        /* Each line needs one more SIGALRM: a lost itimer hangs the program. */
        while (ticks == last) pause();
    }
    printf("done\n");
    return 0;
}
"#;

#[test]
fn c_program_with_setitimer_survives_three_dumps_with_identical_output() {
    let dir = tempdir();
    let exe = compile_c(dir.path(), "alarm", ALARM_C, &[]);
    let w = Workload::new(dir.path(), &[exe.to_str().unwrap()]);
    check_workload("C setitimer program", &w, &[ms(500), ms(600), ms(600)]);
}
