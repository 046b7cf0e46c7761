/* Benchmark program for the copy-on-write engines. Usage: bench_loop SIZE_MIB KIND TIMELINE
 *   KIND dense:  every page written at start; each iteration reads 64 pages and writes 4
 *        sparse: one page in 16 written at start; each iteration writes 4 of those
 *        write:  every page written at start; each iteration writes 64 consecutive pages
 *        read:   every page written at start; each iteration reads 64 pages, one in 64
 *                iterations also writes one (a mostly-reading program)
 * It measures itself: iterations per 10 ms bucket and every gap over 0.2 ms between two
 * iterations (CLOCK_MONOTONIC, the clock the driver uses). On SIGUSR1 it writes both to
 * TIMELINE and exits. READY on stderr once its memory is populated. */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BUCKET_NS 10000000ull
#define MAX_BUCKETS 60000
#define MAX_GAPS 100000
static volatile sig_atomic_t stop;
static void on_usr1(int s) { (void)s; stop = 1; }
static uint64_t now(void) {
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000ull + t.tv_nsec;
}

int main(int argc, char **argv) {
	if (argc < 4) return 2;
	size_t pages = (strtoull(argv[1], 0, 10) << 20) / 4096;
	const char *kind = argv[2];
	int sparse = !strcmp(kind, "sparse"), write_heavy = !strcmp(kind, "write");
	int mostly_read = !strcmp(kind, "read");
	uint64_t iter = 0;
	unsigned char *m = malloc(pages * 4096 + 4096);
	static uint32_t buckets[MAX_BUCKETS];
	static uint64_t gap_at[MAX_GAPS], gap_ns[MAX_GAPS];
	size_t ngaps = 0;
	if (!m) return 1;
	m = (unsigned char *)(((uintptr_t)m + 4095) & ~(uintptr_t)4095);
	for (size_t p = 0; p < pages; p += sparse ? 16 : 1)
		memset(m + p * 4096, (int)(p % 251) + 1, 4096);
	signal(SIGUSR1, on_usr1);
	fprintf(stderr, "READY\n");
	uint64_t x = 88172645463325252ull, sum = 0, start = now(), prev = start, sweep = 0;
	while (!stop) {
		int writes = write_heavy ? 64 : mostly_read ? (iter++ % 64 == 0) : 4;
		for (int k = 0; k < writes; k++) {
			size_t p;
			if (write_heavy) {
				p = sweep++ % pages;
			} else {
				x ^= x << 13; x ^= x >> 7; x ^= x << 17;
				p = x % pages;
				if (sparse) p &= ~(size_t)15;
			}
			m[p * 4096 + (k * 64) % 4096] += 1;
		}
		if (!sparse && !write_heavy) /* dense and read */
			for (int k = 0; k < 64; k++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; sum += m[(x % pages) * 4096]; }
		uint64_t t = now();
		size_t b = (t - start) / BUCKET_NS;
		if (b < MAX_BUCKETS) buckets[b]++;
		if (t - prev > 200000 && ngaps < MAX_GAPS) { gap_at[ngaps] = prev; gap_ns[ngaps++] = t - prev; }
		prev = t;
	}
	FILE *f = fopen(argv[3], "w");
	if (!f) return 1;
	fprintf(f, "start %llu bucket_ns %llu sum %llu\n", (unsigned long long)start, BUCKET_NS, (unsigned long long)sum);
	size_t last = (prev - start) / BUCKET_NS;
	for (size_t b = 0; b <= last && b < MAX_BUCKETS; b++) fprintf(f, "b %u\n", buckets[b]);
	for (size_t i = 0; i < ngaps; i++) fprintf(f, "g %llu %llu\n", (unsigned long long)gap_at[i], (unsigned long long)gap_ns[i]);
	fclose(f);
	return 0;
}
