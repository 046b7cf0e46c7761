/*
 * ticker: a slow, steady program for the cluster tests and the failover benchmark. Not an app
 * of the usual contract: it prints nothing on stderr unless it fails, because a service's
 * stdout and stderr go to the same file.
 *
 * Usage: ticker LINES PERIOD_MS [MIB [PERCENT [stamp]]]
 *
 * Holds MIB MiB (default 4) of anonymous memory, every page written. Each tick it rewrites
 * PERCENT % of the pages (default 1, at least one page; which pages is a deterministic choice),
 * folds what it wrote into a digest, prints `tick N DIGEST` on stdout, flushed at once (so the
 * output file grows while it runs), and sleeps PERIOD_MS. The output does not depend on
 * PERIOD_MS: `ticker 1000 0` prints at once what `ticker 1000 20` prints in 20 s.
 * With `stamp` each line ends in the wall-clock time it was printed (Unix ms), for the
 * benchmark (nondeterministic output, then).
 * At the end it checks every page against the generation it must hold and prints PASS, or
 * FAIL: reason and exits 1.
 */
#define _GNU_SOURCE
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "common.h"

#define PAGE 4096u
#define WORDS_PER_PAGE (PAGE / 8u)

static uint64_t word_of(uint64_t page, uint32_t gen, uint64_t w)
{
	return mix64(page << 32 ^ (uint64_t)gen << 12 ^ w);
}

static void fill(uint64_t *mem, uint64_t page, uint32_t gen)
{
	uint64_t *p = mem + page * WORDS_PER_PAGE;

	for (uint64_t w = 0; w < WORDS_PER_PAGE; w++)
		p[w] = word_of(page, gen, w);
}

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };

	while (clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, &ts) != 0)
		;
}

int main(int argc, char **argv)
{
	if (argc < 3)
		fail("usage: ticker LINES PERIOD_MS [MIB [PERCENT [stamp]]]");
	uint64_t lines = strtoull(argv[1], NULL, 10);
	long period = strtol(argv[2], NULL, 10);
	uint64_t mib = argc > 3 ? strtoull(argv[3], NULL, 10) : 4;
	double percent = argc > 4 ? strtod(argv[4], NULL) : 1.0;
	int stamp = argc > 5 && strcmp(argv[5], "stamp") == 0;
	uint64_t pages = mib * (1u << 20) / PAGE;
	uint64_t per_tick = (uint64_t)((double)pages * percent / 100.0);

	if (pages == 0)
		fail("MIB must be at least 1");
	if (per_tick == 0)
		per_tick = 1;
	uint64_t *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
			     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint32_t *gens = calloc(pages, sizeof *gens);

	if (mem == MAP_FAILED || !gens)
		fail("cannot allocate %llu MiB", (unsigned long long)mib);
	for (uint64_t p = 0; p < pages; p++)
		fill(mem, p, 0);

	uint64_t digest = 0x71c4e7;
	for (uint64_t tick = 1; tick <= lines; tick++) {
		for (uint64_t j = 0; j < per_tick; j++) {
			uint64_t p = mix64(tick << 24 ^ j) % pages;

			gens[p]++;
			fill(mem, p, gens[p]);
			digest = mix64(digest ^ p << 20 ^ gens[p] ^ mem[p * WORDS_PER_PAGE + 7]);
		}
		if (stamp)
			printf("tick %llu %016llx %llu\n", (unsigned long long)tick,
			       (unsigned long long)digest, (unsigned long long)now_ms());
		else
			printf("tick %llu %016llx\n", (unsigned long long)tick,
			       (unsigned long long)digest);
		fflush(stdout);
		if (period > 0 && tick < lines)
			sleep_ms(period);
	}
	for (uint64_t p = 0; p < pages; p++)
		for (uint64_t w = 0; w < WORDS_PER_PAGE; w++)
			if (mem[p * WORDS_PER_PAGE + w] != word_of(p, gens[p], w))
				fail("page %llu word %llu does not hold generation %u",
				     (unsigned long long)p, (unsigned long long)w, gens[p]);
	pass();
	return 0;
}
