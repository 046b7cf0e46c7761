/*
 * incr: a program whose memory changes a little between checkpoints, in every way incremental
 * checkpoints must follow, with an invariant that a wrong page from any image of a chain breaks.
 *
 *   region A  64 MiB (mmap), 16384 pages. Every byte of page i is a function of (i, gen[i]);
 *             gen[i] == 0 means the page is all zero.
 *   region B  4 MiB whose content is a function of its own generation `bgen`; every MOVE_EVERY
 *             generations it is moved with mremap to another address (alternating between two
 *             reserved places) and rewritten.
 *   each generation g (about 1 ms apart):
 *     - WRITES pseudo-random pages of A are rewritten with generation g (checking first that
 *       they hold what gen[] says);
 *     - one page of A is filled by the kernel: its new content goes through a pipe and read()
 *       puts it into place;
 *     - every DISCARD_EVERY generations a run of DISCARD pages is dropped with MADV_DONTNEED
 *       (they read as zero afterwards: gen = 0);
 *     - every CHECK_EVERY generations, all of A and B are checked against gen[] and bgen.
 *   stdout: one line per generation with a running checksum of (i, g) pairs; deterministic.
 *
 * A process restored from an image in which some page comes from the wrong image of a chain
 * (too old, too new, or not zeroed after a discard) finds a page that does not match gen[] and
 * prints FAIL.
 *
 * Usage: incr [GENERATIONS]    (default 3000, about 4 s here)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

#define PAGE 4096UL
#define WORDS (PAGE / 8)
#define NPAGES 16384
#define BPAGES 1024
#define WRITES 40
#define DISCARD_EVERY 50
#define DISCARD 300
#define MOVE_EVERY 200
#define CHECK_EVERY 100

static unsigned char *A, *B;
static unsigned char *bplace[2];
static unsigned gen[NPAGES];
static unsigned bgen;

static void fill(uint64_t *w, uint64_t i, unsigned g)
{
	if (g == 0) {
		memset(w, 0, PAGE);
		return;
	}
	uint64_t x = mix64(i * 0x100000001ULL + g);
	for (unsigned k = 0; k < WORDS; k++)
		w[k] = x + k * 0x9e3779b97f4a7c15ULL;
}

static void check_page(uint64_t i, const char *when)
{
	uint64_t want[WORDS];
	fill(want, i, gen[i]);
	if (memcmp(A + i * PAGE, want, PAGE) != 0)
		fail("page %lu does not hold generation %u (%s)", (unsigned long)i, gen[i], when);
}

static void fill_b(unsigned g)
{
	for (unsigned p = 0; p < BPAGES; p++)
		fill((uint64_t *)(B + p * PAGE), 1000000 + p, g);
}

static void check_b(const char *when)
{
	uint64_t want[WORDS];
	for (unsigned p = 0; p < BPAGES; p++) {
		fill(want, 1000000 + p, bgen);
		if (memcmp(B + p * PAGE, want, PAGE) != 0)
			fail("region B page %u does not hold generation %u (%s)", p, bgen, when);
	}
}

int main(int argc, char **argv)
{
	unsigned gens = argc > 1 ? (unsigned)strtoul(argv[1], 0, 10) : 3000;
	A = mmap(NULL, NPAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	/* Two places for B, reserved up front so a move never lands on something else. */
	unsigned char *places = mmap(NULL, 2 * BPAGES * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (A == MAP_FAILED || places == MAP_FAILED)
		fail("mmap: %s", strerror(errno));
	bplace[0] = places;
	bplace[1] = places + BPAGES * PAGE;
	B = mmap(bplace[0], BPAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
	if (B == MAP_FAILED)
		fail("mmap B: %s", strerror(errno));
	int pfd[2];
	if (pipe(pfd) != 0)
		fail("pipe: %s", strerror(errno));
	/* Half of A starts written, half untouched. */
	for (unsigned i = 0; i < NPAGES; i += 2) {
		gen[i] = 1;
		fill((uint64_t *)(A + i * PAGE), i, 1);
	}
	bgen = 1;
	fill_b(bgen);
	ready();

	uint64_t sum = 0, rng = 12345;
	struct timespec tick = { 0, 1000000 };
	for (unsigned g = 2; g <= gens; g++) {
		if (g == gens / 2)
			phase2();
		for (unsigned k = 0; k < WRITES; k++) {
			rng = mix64(rng);
			unsigned i = rng % NPAGES;
			check_page(i, "before rewriting it");
			gen[i] = g;
			fill((uint64_t *)(A + i * PAGE), i, g);
			sum = mix64(sum ^ (i * 65536ULL + g));
		}
		/* The kernel writes this one. */
		rng = mix64(rng);
		unsigned i = rng % NPAGES;
		uint64_t buf[WORDS];
		fill(buf, i, g);
		if (write(pfd[1], buf, PAGE) != (ssize_t)PAGE)
			fail("write to pipe: %s", strerror(errno));
		size_t got = 0;
		while (got < PAGE) {
			ssize_t n = read(pfd[0], A + i * PAGE + got, PAGE - got);
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0)
				fail("read from pipe: %s", strerror(errno));
			got += n;
		}
		gen[i] = g;
		if (g % DISCARD_EVERY == 0) {
			rng = mix64(rng);
			unsigned first = rng % (NPAGES - DISCARD);
			if (madvise(A + first * PAGE, DISCARD * PAGE, MADV_DONTNEED) != 0)
				fail("madvise: %s", strerror(errno));
			for (unsigned p = first; p < first + DISCARD; p++)
				gen[p] = 0;
			sum = mix64(sum ^ first);
		}
		if (g % MOVE_EVERY == 0) {
			check_b("before moving it");
			unsigned char *to = B == bplace[0] ? bplace[1] : bplace[0];
			unsigned char *moved = mremap(B, BPAGES * PAGE, BPAGES * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, to);
			if (moved == MAP_FAILED)
				fail("mremap: %s", strerror(errno));
			/* The place it left must stay reserved. */
			if (mmap(B, BPAGES * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED)
				fail("mmap: %s", strerror(errno));
			B = moved;
			check_b("after moving it");
			bgen = g;
			fill_b(bgen);
		}
		if (g % CHECK_EVERY == 0) {
			for (unsigned p = 0; p < NPAGES; p++)
				check_page(p, "full check");
			check_b("full check");
		}
		printf("gen %u sum %016llx\n", g, (unsigned long long)sum);
		while (nanosleep(&tick, &tick) != 0 && errno == EINTR)
			;
		tick.tv_nsec = 1000000;
	}
	for (unsigned p = 0; p < NPAGES; p++)
		check_page(p, "at the end");
	check_b("at the end");
	pass();
	return 0;
}
