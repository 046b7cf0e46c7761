/* Benchmark program for scripts/bench_incremental.py: fills SIZE_MIB of memory with non-zero data,
 * prints READY on stderr, then for each line "PCT" on stdin rewrites about PCT percent of its
 * pages (a different pseudo-random set each time) and answers "rewrote N" on stdout. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

static uint64_t mix64(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

int main(int argc, char **argv)
{
	size_t mib = argc > 1 ? strtoul(argv[1], 0, 10) : 1024;
	size_t pages = mib << 8;
	unsigned char *a = mmap(NULL, pages * 4096, PROT_READ | PROT_WRITE,
				MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (a == MAP_FAILED)
		return 1;
	madvise(a, pages * 4096, MADV_NOHUGEPAGE);
	for (size_t i = 0; i < pages * 4096; i += 8)
		*(uint64_t *)(a + i) = mix64(i) | 1;
	fprintf(stderr, "READY\n");
	char line[64];
	for (uint64_t round = 1; fgets(line, sizeof line, stdin); round++) {
		double pct = atof(line);
		uint64_t limit = (uint64_t)(pct / 100.0 * (double)UINT64_MAX);
		size_t n = 0;
		for (size_t p = 0; p < pages; p++) {
			if (mix64(p * 1000003ULL + round) <= limit) {
				uint64_t *w = (uint64_t *)(a + p * 4096);
				for (int k = 0; k < 512; k++)
					w[k] = mix64(w[k] + round) | 1;
				n++;
			}
		}
		printf("rewrote %zu\n", n);
		fflush(stdout);
	}
	return 0;
}
