/* Benchmark program for scripts/bench_restore.sh: fills SIZE_MIB of heap with non-zero data
 * (every page differs), prints READY on stderr and waits in pause() (every checkpoint interrupts
 * it). Once it finds itself restored (its PID changed, or, restored in its own PID namespace
 * with the same PID, its parent is that namespace's reaper, PID 1), it reads one word of every page, checks
 * the sum against the one taken before the checkpoint, prints
 *   RESTORED resumed_us=T0 resident_us=T1 ok|BAD
 * (CLOCK_MONOTONIC, microseconds) on stderr and exits 0 (1 if the memory came back wrong). */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static unsigned long long now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000ULL + t.tv_nsec / 1000;
}

static unsigned long sum_pages(const volatile unsigned long *a, size_t n) {
    unsigned long s = 0;
    for (size_t i = 0; i < n / 8; i += 4096 / 8) s += a[i] * (i | 1);
    return s;
}

int main(int argc, char **argv) {
    size_t n = (size_t)(argc > 1 ? strtoul(argv[1], 0, 10) : 1024) << 20;
    unsigned long *a = malloc(n);
    if (!a) return 2;
    for (size_t i = 0; i < n / 8; i++) a[i] = i * 2654435761UL + 1;
    unsigned long want = sum_pages(a, n);
    pid_t pid0 = getpid(), ppid0 = getppid();
    fprintf(stderr, "READY\n");
    while (getpid() == pid0 && getppid() == ppid0) pause();
    unsigned long long t0 = now_us();
    unsigned long got = sum_pages(a, n);
    unsigned long long t1 = now_us();
    fprintf(stderr, "RESTORED resumed_us=%llu resident_us=%llu %s\n", t0, t1,
            got == want ? "ok" : "BAD");
    return got == want ? 0 : 1;
}
