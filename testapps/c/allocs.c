/*
 * allocs: allocation churn through whatever allocator the program is linked with or preloads
 * (glibc, jemalloc, tcmalloc, mimalloc). Three threads, created afresh every round, each keep
 * 2048 blocks of 1 byte to 1 MiB (and now and then 40 MiB) that they allocate with malloc,
 * calloc, memalign, posix_memalign and aligned_alloc, grow and shrink with realloc and free all
 * the time, so a checkpoint lands inside the allocator. Every block is written over its whole
 * malloc_usable_size: a block's own bytes are a function of (thread, slot, generation), the
 * rest of its usable size a fixed filler that must stay intact (a usable size taken from another
 * allocator than the one that made the block shows there, or crashes).
 *
 * Output: per round and thread, a running checksum of the blocks' contents and sizes every
 * 200 operations (never of addresses or usable sizes, which differ between allocators).
 *
 * Usage: allocs [ROUNDS]      (default 40)
 */
#include <malloc.h>
#include <pthread.h>
#include <string.h>

#include "common.h"

#define THREADS 3
#define SLOTS 2048
#define OPS 3000
#define MAX_ROUNDS 1000
#define FILLER 0xa5
#define MARK_EVERY 200 /* operations between two sums printed */

struct block {
	unsigned char *p;
	size_t size;
	uint64_t tag;
	int zeroed; /* from calloc, not written yet */
};

struct worker {
	int id;
	uint64_t step;
	uint64_t sum;
	uint64_t marks[OPS / MARK_EVERY];
	struct block slots[SLOTS];
};

static struct worker workers[THREADS];

/* Word i of a block's content; its bytes in little-endian order. */
static uint64_t word_at(uint64_t tag, size_t i) { return tag ^ (i * 0x9e3779b97f4a7c15ULL); }

static unsigned char byte_at(uint64_t tag, size_t i)
{
	return (unsigned char)(word_at(tag, i >> 3) >> ((i & 7) * 8));
}

static size_t pick_size(uint64_t r)
{
	uint64_t pct = r % 1000, x = r >> 10;

	if (pct < 800)
		return 1 + x % 256;
	if (pct < 990)
		return 257 + x % (8 << 10);
	if (pct < 999 || x % 16)
		return (8 << 10) + x % (1 << 20);
	return (40 << 20) + x % 4096; /* one allocation in 16000 */
}

/* Indices checked in a block of n bytes: all of a small one, a sample of a large one. */
static size_t check_step(size_t n) { return n <= 1024 ? 1 : n / 251; }

static void fill(struct block *b)
{
	size_t usable = malloc_usable_size(b->p);

	if (usable < b->size)
		fail("malloc_usable_size %zu below the %zu bytes asked for", usable, b->size);
	size_t words = b->size / 8;

	for (size_t i = 0; i < words; i++) {
		uint64_t v = word_at(b->tag, i);
		memcpy(b->p + 8 * i, &v, 8);
	}
	for (size_t i = 8 * words; i < b->size; i++)
		b->p[i] = byte_at(b->tag, i);
	memset(b->p + b->size, FILLER, usable - b->size);
	b->zeroed = 0;
}

/* Checks the block's bytes (the first n of them) and folds them into the worker's sum. */
static void check(struct worker *w, const struct block *b, size_t n, const char *when)
{
	uint64_t h = b->tag ^ b->size;
	size_t step = check_step(n);

	for (size_t i = 0; i < n; i += step) {
		unsigned char want = b->zeroed ? 0 : byte_at(b->tag, i);
		if (b->p[i] != want)
			fail("thread %d: byte %zu of a %zu-byte block is %u, not %u (%s)", w->id, i,
			     b->size, b->p[i], want, when);
		h = mix64(h ^ b->p[i]);
	}
	if (n && b->p[n - 1] != (b->zeroed ? 0 : byte_at(b->tag, n - 1)))
		fail("thread %d: last byte of a %zu-byte block changed (%s)", w->id, b->size, when);
	w->sum = mix64(w->sum ^ h);
}

static void check_filler(struct worker *w, const struct block *b)
{
	size_t usable = malloc_usable_size(b->p);

	for (size_t i = b->size; i < usable; i += check_step(usable - b->size))
		if (b->p[i] != FILLER)
			fail("thread %d: byte %zu past the %zu asked for was overwritten", w->id, i,
			     b->size);
}

static void *aligned(uint64_t r, size_t size, size_t *align)
{
	void *p = NULL;

	*align = (size_t)16 << (r % 9); /* 16 .. 4096 */
	/* Never a multiple of the alignment: Debian's mimalloc 2.0.9 returns blocks aligned to 128
	 * only for memalign(256, 256) and the like, with or without snapshim. */
	if (size % *align == 0)
		size++;
	switch ((r >> 8) % 3) {
	case 0:
		return memalign(*align, size);
	case 1:
		return posix_memalign(&p, *align, size) == 0 ? p : NULL;
	default:
		return aligned_alloc(*align, size); /* any size, as C17 allows */
	}
}

static void new_block(struct worker *w, struct block *b, uint64_t r)
{
	size_t align = 1;

	b->size = pick_size(r >> 4);
	b->tag = mix64(((uint64_t)w->id << 56) ^ w->step);
	switch (r % 4) {
	case 0:
		b->p = calloc(1, b->size);
		break;
	case 1:
		b->p = aligned(r >> 8, b->size, &align);
		break;
	default:
		b->p = malloc(b->size);
	}
	if (!b->p)
		fail("thread %d: allocating %zu bytes failed", w->id, b->size);
	if ((uintptr_t)b->p % align)
		fail("thread %d: %p is not aligned to %zu", w->id, (void *)b->p, align);
	if (r % 4 == 0) {
		b->zeroed = 1;
		check(w, b, b->size, "calloc");
		if (r & 0x100) { /* kept zeroed until its next use */
			size_t usable = malloc_usable_size(b->p);
			memset(b->p + b->size, FILLER, usable - b->size);
			return;
		}
	}
	fill(b);
}

static void resize(struct worker *w, struct block *b, uint64_t r)
{
	size_t keep = b->size, size = pick_size(r);
	unsigned char *p = realloc(b->p, size);

	if (!p)
		fail("thread %d: realloc to %zu bytes failed", w->id, size);
	b->p = p;
	check(w, b, keep < size ? keep : size, "after realloc");
	b->size = size;
	b->tag = mix64(b->tag + 1);
	fill(b);
}

static void step(struct worker *w)
{
	uint64_t r = mix64(((uint64_t)w->id << 48) ^ w->step);
	struct block *b = &w->slots[r % SLOTS];

	w->step++;
	r >>= 11;
	if (!b->p) {
		new_block(w, b, r);
		return;
	}
	check(w, b, b->size, "in use");
	check_filler(w, b);
	switch (r % 3) {
	case 0:
		free(b->p);
		b->p = NULL;
		break;
	case 1:
		resize(w, b, r >> 2);
		break;
	default:
		free(b->p);
		new_block(w, b, r >> 2);
	}
}

static void *work(void *arg)
{
	struct worker *w = arg;

	for (int i = 0; i < OPS; i++) {
		step(w);
		if ((i + 1) % MARK_EVERY == 0)
			w->marks[i / MARK_EVERY] = w->sum;
	}
	return NULL;
}

int main(int argc, char **argv)
{
	int rounds = argc > 1 ? atoi(argv[1]) : 40;
	pthread_t tids[THREADS];

	if (rounds < 2 || rounds > MAX_ROUNDS)
		fail("rounds must be in 2..%d", MAX_ROUNDS);
	for (int t = 0; t < THREADS; t++)
		workers[t].id = t;
	printf("allocs: %d threads, %d slots, %d operations a round, %d rounds\n", THREADS, SLOTS,
	       OPS, rounds);
	ready();
	for (int round = 0; round < rounds; round++) {
		if (round == rounds / 2)
			phase2();
		for (int t = 0; t < THREADS; t++)
			if (pthread_create(&tids[t], NULL, work, &workers[t]))
				fail("pthread_create failed");
		for (int t = 0; t < THREADS; t++) {
			pthread_join(tids[t], NULL);
			printf("round %3d thread %d:", round, t);
			for (int m = 0; m < OPS / MARK_EVERY; m++)
				printf("%s%016llx", m % 5 ? " " : "\n ",
				       (unsigned long long)workers[t].marks[m]);
			printf("\n");
		}
	}
	for (int t = 0; t < THREADS; t++) {
		struct worker *w = &workers[t];
		size_t live = 0;
		for (int s = 0; s < SLOTS; s++) {
			struct block *b = &w->slots[s];
			if (!b->p)
				continue;
			check(w, b, b->size, "at the end");
			check_filler(w, b);
			free(b->p);
			live++;
		}
		printf("thread %d: %zu blocks live at the end, sum %016llx\n", t, live,
		       (unsigned long long)w->sum);
	}
	pass();
	return 0;
}
