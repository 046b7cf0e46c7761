/*
 * demo_app: a deterministic, single-threaded computation for the snapshim demo.
 *
 * It counts the primes below 2^35 = 34359738368 with a segmented sieve of Eratosthenes, in 30
 * equal steps, and prints one progress line per step (about one per second on a 2-core Debian
 * 12 VM), then the answer:
 *
 *     answer: 1480206279
 *
 * pi(2^35) = 1480206279 is a published value (OEIS A007053), so a run that was checkpointed,
 * killed and restored can be checked against it without an uninterrupted run. Every line of
 * stdout is a pure function of the arguments: two runs print byte-identical output.
 *
 * Usage: demo_app [LOG2_LIMIT]   (default 35; smaller values run faster, for testing)
 *
 * stdout is line-buffered on purpose, so that each progress line reaches the file as soon as it
 * is printed (and so that the file's length at a checkpoint matches the lines printed).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define STEPS 30
/* Odd numbers per sieve segment: 256 KiB of flags, which stays in the L2 cache. */
#define SEGMENT (1u << 18)

static uint32_t *base_primes; /* odd primes up to sqrt(limit) */
static size_t n_base;
static unsigned char segment[SEGMENT];

/* Odd primes p with p*p < limit, by a plain sieve. */
static void find_base_primes(uint64_t limit)
{
    uint32_t root = 1;
    while ((uint64_t)root * root < limit)
        root++;
    unsigned char *composite = calloc(root + 1, 1);
    base_primes = malloc(sizeof(uint32_t) * (root + 1));
    if (!composite || !base_primes) {
        perror("demo_app: malloc");
        exit(1);
    }
    for (uint32_t i = 3; i <= root; i += 2) {
        if (composite[i])
            continue;
        base_primes[n_base++] = i;
        for (uint64_t j = (uint64_t)i * i; j <= root; j += 2 * i)
            composite[j] = 1;
    }
    free(composite);
}

/* Number of odd primes in [lo, hi), lo and hi even. */
static uint64_t count_odd_primes(uint64_t lo, uint64_t hi)
{
    uint64_t count = 0;
    for (uint64_t start = lo + 1; start < hi; start += 2 * (uint64_t)SEGMENT) {
        /* segment[j] stands for the odd number start + 2j */
        uint64_t end = start + 2 * (uint64_t)SEGMENT; /* exclusive */
        if (end > hi)
            end = hi;
        uint64_t n = (end - start + 1) / 2;
        memset(segment, 0, n);
        for (size_t k = 0; k < n_base; k++) {
            uint64_t p = base_primes[k];
            uint64_t m = p * p;
            if (m >= end)
                break;
            if (m < start) {
                m = (start + p - 1) / p * p;
                if (!(m & 1))
                    m += p;
            }
            for (uint64_t j = (m - start) / 2; j < n; j += p)
                segment[j] = 1;
        }
        if (start == 1)
            segment[0] = 1; /* 1 is not prime */
        for (uint64_t j = 0; j < n; j++)
            count += !segment[j];
    }
    return count;
}

int main(int argc, char **argv)
{
    int log2_limit = argc > 1 ? atoi(argv[1]) : 35;
    if (log2_limit < 8 || log2_limit > 40) {
        fprintf(stderr, "usage: demo_app [LOG2_LIMIT between 8 and 40]\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    uint64_t limit = (uint64_t)1 << log2_limit;
    find_base_primes(limit);
    printf("demo_app: counting the primes below 2^%d = %llu in %d steps\n", log2_limit,
           (unsigned long long)limit, STEPS);

    uint64_t primes = 1; /* the prime 2 */
    uint64_t lo = 0;
    for (int step = 1; step <= STEPS; step++) {
        uint64_t hi = limit / STEPS * step;
        if (step == STEPS)
            hi = limit;
        hi &= ~(uint64_t)1;
        primes += count_odd_primes(lo, hi);
        lo = hi;
        printf("step %d/%d: primes below %llu: %llu\n", step, STEPS, (unsigned long long)hi,
               (unsigned long long)primes);
    }
    printf("answer: %llu\n", (unsigned long long)primes);
    return 0;
}
