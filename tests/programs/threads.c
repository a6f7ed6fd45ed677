/* Four threads taking work items under a mutex, the main thread printing each result
   in order as soon as it is done (condition variable). Output depends only on N.
   Used by migd/tests/workloads.rs and tests/tests/workloads_across.rs. */
#include <pthread.h>
#include <stdio.h>
#include <stdint.h>
#include <unistd.h>
#ifndef N
#define N 600
#endif
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t done_cv = PTHREAD_COND_INITIALIZER;
static int next_item, done[N];
static uint64_t result[N];
static void *worker(void *arg) {
    (void)arg;
    for (;;) {
        pthread_mutex_lock(&mu);
        int i = next_item++;
        pthread_mutex_unlock(&mu);
        if (i >= N) return 0;
        uint64_t h = (uint64_t)i * 2654435761u;
        for (int k = 0; k < 2000000; k++) { h ^= h >> 13; h *= 0x9E3779B97F4A7C15ull; h += k; }
        usleep(1000);
        pthread_mutex_lock(&mu);
        result[i] = h; done[i] = 1;
        pthread_cond_broadcast(&done_cv);
        pthread_mutex_unlock(&mu);
    }
}
int main(void) {
    pthread_t t[4];
    for (int i = 0; i < 4; i++) pthread_create(&t[i], 0, worker, 0);
    for (int i = 0; i < N; i++) {
        pthread_mutex_lock(&mu);
        while (!done[i]) pthread_cond_wait(&done_cv, &mu);
        pthread_mutex_unlock(&mu);
        printf("%d %016llx\n", i, (unsigned long long)result[i]);
        fflush(stdout);
    }
    for (int i = 0; i < 4; i++) pthread_join(t[i], 0);
    printf("joined\n");
    return 0;
}
