/*
 * pattern: memory that changes all the time, with an invariant that a torn image breaks.
 *
 * A snapshot must be exact: every byte of the image from one instant, the one at which the
 * threads were stopped, whatever the program writes while the image is being written (engine
 * `fork`) or however long it stays parked (engine `stop`). This app makes any mix of pages from
 * different instants visible:
 *
 *   region   256 MiB (malloc), 65536 pages of 4 KiB. Word k of page i is
 *            page_seed(i, gen[i]) + k * STEP: every byte is a function of (i, gen[i]).
 *   gen[]    (heap, 256 KiB) the generation each page was last written with.
 *   main     generations g = 1, 2, ...: rewrites 2000 pseudo-random pages with generation g
 *            (checking first that each still holds what gen[] says, then content, then gen[i]),
 *            folding (i, g) into a running checksum; reads 16 KiB per generation from a pipe into
 *            a 1 MiB ring (the kernel writes that memory) and checks it; every REMAP_EVERY
 *            generations verifies an 8 MiB region, munmaps and re-mmaps it (or, every other
 *            time, discards its pages with MADV_DONTNEED) and fills it with a pattern of its own; every THREAD_EVERY generations starts a short-lived thread that
 *            rewrites 300 more pages (same protocol) while main waits in pthread_join.
 *   feeder   writes a deterministic byte stream into the pipe in writes of 1..4096 bytes, and
 *            every SIGNAL_EVERY writes sends main a SIGUSR1, handled on an alternate signal
 *            stack in the heap (the kernel writes the signal frame there) by a handler that
 *            writes a heap word; neither changes the output.
 *   checks   every CHECK_EVERY generations and at the end: all 65536 pages against content
 *            regenerated from gen[] (memcmp), the 8 MiB region, the last 64 pipe chunks in the
 *            ring.
 *
 * Only one page is ever being written at a time (main writes, or the short-lived thread writes
 * while main is blocked in pthread_join), and `writing_page` names it while it is: between
 * instructions, "page i == f(i, gen[i])" can be false for that one page only, and the full check
 * allows it (each word from gen[i] or from writing_gen). No check runs while a page is being
 * written, so in practice every page must match: a process restored from an exact image first
 * finishes the write it was interrupted in. A process restored from an image that mixes
 * instants (gen[] from one, some pages from another) finds a page whose content belongs to
 * another generation than gen[] says, at the latest when it next rewrites that page or at the
 * next full check, and prints FAIL.
 *
 * stdout: one line per generation (pages written, checksum), one per check; deterministic, more
 * than one stdio buffer.
 *
 * PATTERN_SELFTEST=1 (no shim needed): right before the check at the middle of the run, page
 * SELFTEST_PAGE gets the next generation's content without gen[] being updated, as a torn image
 * would leave it; the check must print FAIL and exit 1.
 *
 * Usage: pattern [GENERATIONS]    (default 384, about 2 s here)
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "common.h"

#define PAGE 4096
#define WORDS (PAGE / 8)
#define NPAGES 65536 /* 256 MiB */
#define PER_GEN 2000
#define THREAD_PAGES 300
#define CHECK_EVERY 32
#define REMAP_EVERY 16
#define THREAD_EVERY 8
#define MAX_GENS 4096

#define R8_PAGES 2048 /* 8 MiB */
#define CHUNK 16384   /* pipe bytes per generation */
#define RING_CHUNKS 64
#define RING (CHUNK * RING_CHUNKS) /* 1 MiB */

#define SELFTEST_PAGE 12345u
#define SIGNAL_EVERY 16
#define ALTSTACK (64 * 1024)

#define barrier() __asm__ volatile("" ::: "memory")

static unsigned char *region;
static uint32_t *gen;
/* The page being written (-1: none) and the generation it is being written with. */
static volatile int64_t writing_page = -1;
static volatile uint32_t writing_gen;
static uint64_t checksum = 0x5eed;
static uint64_t pages_written;

/* The 8 MiB region: its mapping and the id of the pattern it holds (r8_id 0: being replaced). */
static uint64_t *r8;
static volatile uint32_t r8_id;
static uint32_t r8_remaps;

static int pipe_fd[2];
static unsigned char *ring;
static uint64_t pipe_bytes; /* bytes read so far; chunk c of the stream is ring slot c % 64 */
static uint64_t total_bytes;

static int generations;

static pthread_t main_thread;
static volatile uint64_t *signal_word; /* heap, written by the SIGUSR1 handler */

static void on_usr1(int sig)
{
	(void)sig;
	*signal_word += 1;
}

static const uint64_t STEP = 0x9e3779b97f4a7c15ULL;

static inline uint64_t page_seed(uint32_t i, uint32_t g)
{
	return mix64(((uint64_t)i << 32) ^ g ^ 0x70a6e000000000ULL);
}

/* Word k of page i at generation g is page_seed(i, g) + k * STEP. */
static void fill_page(uint64_t *p, uint32_t i, uint32_t g)
{
	uint64_t s = page_seed(i, g);

	for (int k = 0; k < WORDS; k++)
		p[k] = s + (uint64_t)k * STEP;
}

/* Whether page p holds exactly what generation g wrote into page i. */
static int page_ok(const uint64_t *p, uint32_t i, uint32_t g)
{
	uint64_t s = page_seed(i, g), diff = 0;

	for (int k = 0; k < WORDS; k++)
		diff |= p[k] ^ (s + (uint64_t)k * STEP);
	return diff == 0;
}

static void describe_page(uint32_t i, uint32_t upto, char *what, size_t size);

/* Every write first checks what it overwrites, so a page torn in an image is caught at its next
 * rewrite even if that comes before the next full check. */
static void write_page(uint32_t i, uint32_t g)
{
	uint64_t *p = (uint64_t *)(region + (size_t)i * PAGE);

	if (!page_ok(p, i, gen[i])) {
		char what[64];

		describe_page(i, g, what, sizeof what);
		fail("about to write generation %u into page %u: it holds %s, gen[] says %u", g, i,
		     what, gen[i]);
	}
	writing_gen = g;
	writing_page = i;
	barrier();
	fill_page(p, i, g);
	barrier();
	gen[i] = g;
	barrier();
	writing_page = -1;
	checksum = mix64(checksum ^ ((uint64_t)i << 32 | g));
	pages_written++;
}

static uint32_t pick(uint32_t g, uint32_t j, uint64_t salt)
{
	return (uint32_t)(mix64(((uint64_t)g << 32 | j) ^ salt) % NPAGES);
}

/* Byte n of the pipe stream. */
static inline unsigned char stream_byte(uint64_t n)
{
	return (unsigned char)(mix64(0xf1f0000000000000ULL ^ (n >> 3)) >> (8 * (n & 7)));
}

static void *feeder(void *arg)
{
	static unsigned char buf[4096];
	uint64_t n = 0, k = 0;

	(void)arg;
	while (n < total_bytes) {
		size_t len = 1 + (size_t)(mix64(0xfeed ^ k++) % sizeof buf);

		if (len > total_bytes - n)
			len = (size_t)(total_bytes - n);
		for (size_t b = 0; b < len; b++)
			buf[b] = stream_byte(n + b);
		if (k % SIGNAL_EVERY == 0)
			pthread_kill(main_thread, SIGUSR1);
		size_t off = 0;
		while (off < len) {
			ssize_t w = write(pipe_fd[1], buf + off, len - off);

			if (w < 0 && errno == EINTR)
				continue;
			if (w <= 0)
				fail("write to pipe: %s", strerror(errno));
			off += (size_t)w;
		}
		n += len;
	}
	close(pipe_fd[1]);
	return NULL;
}

/* Reads one CHUNK of the stream into its ring slot, checks it and folds it in. */
static void read_chunk(void)
{
	uint64_t chunk = pipe_bytes / CHUNK;
	unsigned char *slot = ring + (chunk % RING_CHUNKS) * CHUNK;
	size_t got = 0;

	while (got < CHUNK) {
		ssize_t n = read(pipe_fd[0], slot + got, CHUNK - got);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			fail("read from pipe: %s", strerror(errno));
		if (n == 0)
			fail("pipe closed after %llu bytes", (unsigned long long)(pipe_bytes + got));
		got += (size_t)n;
	}
	uint64_t h = chunk;
	for (size_t b = 0; b < CHUNK; b++) {
		if (slot[b] != stream_byte(pipe_bytes + b))
			fail("pipe byte %llu is %02x, not %02x", (unsigned long long)(pipe_bytes + b),
			     slot[b], stream_byte(pipe_bytes + b));
		h = h * 0x100000001b3ULL ^ slot[b];
	}
	pipe_bytes += CHUNK;
	checksum = mix64(checksum ^ h);
}

static inline uint64_t r8_word(uint32_t id, uint64_t w)
{
	return mix64(0x8888000000000000ULL ^ ((uint64_t)id << 32) ^ (w >> 9)) + (w & 511) * STEP;
}

static void r8_verify(const char *when)
{
	for (uint64_t w = 0; w < (uint64_t)R8_PAGES * WORDS; w++)
		if (r8[w] != r8_word(r8_id, w))
			fail("8 MiB region (pattern %u) %s: word %llu is %016llx, not %016llx", r8_id,
			     when, (unsigned long long)w, (unsigned long long)r8[w],
			     (unsigned long long)r8_word(r8_id, w));
}

/* Verifies the 8 MiB region, unmaps it, maps a new one and fills it with pattern `id`. */
static void r8_replace(uint32_t id)
{
	if (r8) {
		r8_verify("before munmap");
		r8_id = 0;
		barrier();
		if (id % 2 == 0) {
			/* Every other time the pages are thrown away in place (they read as zero). */
			if (madvise(r8, (size_t)R8_PAGES * PAGE, MADV_DONTNEED))
				fail("madvise(MADV_DONTNEED): %s", strerror(errno));
			if (r8[0] != 0 || r8[(size_t)R8_PAGES * WORDS - 1] != 0)
				fail("the 8 MiB region is not zero after MADV_DONTNEED");
			goto fill;
		}
		if (munmap(r8, (size_t)R8_PAGES * PAGE))
			fail("munmap: %s", strerror(errno));
	}
	r8 = mmap(NULL, (size_t)R8_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
		  -1, 0);
	if (r8 == MAP_FAILED)
		fail("mmap 8 MiB: %s", strerror(errno));
fill:
	for (uint64_t w = 0; w < (uint64_t)R8_PAGES * WORDS; w++)
		r8[w] = r8_word(id, w);
	barrier();
	r8_id = id;
	checksum = mix64(checksum ^ 0x8888 ^ id);
}

/* Which generation's content page i holds, if any (for failure messages). */
static void describe_page(uint32_t i, uint32_t upto, char *what, size_t size)
{
	const uint64_t *p = (const uint64_t *)(region + (size_t)i * PAGE);

	for (uint32_t g = 0; g <= upto; g++)
		if (page_ok(p, i, g)) {
			snprintf(what, size, "generation %u's content", g);
			return;
		}
	snprintf(what, size, "the content of no generation up to %u", upto);
}

static void check(int g)
{
	static uint64_t want[WORDS];
	uint32_t bad = 0, first_bad = 0;
	int64_t skip = writing_page;

	for (uint32_t i = 0; i < NPAGES; i++) {
		const unsigned char *p = region + (size_t)i * PAGE;

		fill_page(want, i, gen[i]);
		if (memcmp(p, want, PAGE) == 0)
			continue;
		if ((int64_t)i == skip) {
			/* The one page being written: each word from the old or the new generation. */
			uint64_t s = page_seed(i, writing_gen);
			const uint64_t *q = (const uint64_t *)p;
			int k = 0;

			while (k < WORDS && (q[k] == want[k] || q[k] == s + (uint64_t)k * STEP))
				k++;
			if (k == WORDS)
				continue;
		}
		if (!bad++)
			first_bad = i;
	}
	if (bad) {
		char what[64];

		describe_page(first_bad, (uint32_t)g, what, sizeof what);
		fail("check at generation %d: %u of %d pages disagree with gen[]; first: page %u "
		     "holds %s, gen[] says %u (writing_page %lld)",
		     g, bad, NPAGES, first_bad, what, gen[first_bad], (long long)skip);
	}
	r8_verify("at a check");
	uint64_t chunks = pipe_bytes / CHUNK;
	for (uint64_t c = chunks > RING_CHUNKS ? chunks - RING_CHUNKS : 0; c < chunks; c++) {
		const unsigned char *slot = ring + (c % RING_CHUNKS) * CHUNK;

		for (size_t b = 0; b < CHUNK; b++)
			if (slot[b] != stream_byte(c * CHUNK + b))
				fail("check at generation %d: ring byte %zu of pipe chunk %llu is %02x, "
				     "not %02x",
				     g, b, (unsigned long long)c, slot[b], stream_byte(c * CHUNK + b));
	}
	printf("check at generation %d: %d pages match gen[], 8 MiB region pattern %u intact, "
	       "%llu pipe bytes read, ring intact; checksum %016llx\n",
	       g, NPAGES, r8_id, (unsigned long long)pipe_bytes, (unsigned long long)checksum);
}

struct burst {
	uint32_t g;
};

static void *burst_thread(void *arg)
{
	const struct burst *b = arg;

	for (uint32_t j = 0; j < THREAD_PAGES; j++)
		write_page(pick(b->g, j, 0x7417ead000000000ULL), b->g);
	return (void *)(intptr_t)0xb0057;
}

int main(int argc, char **argv)
{
	const char *selftest_env = getenv("PATTERN_SELFTEST");
	int selftest = selftest_env && strcmp(selftest_env, "0") != 0;
	pthread_t t_feed;
	int e;

	generations = argc > 1 ? atoi(argv[1]) : 384;
	if (generations < 2 * CHECK_EVERY || generations > MAX_GENS)
		fail("generations must be in %d..%d", 2 * CHECK_EVERY, MAX_GENS);
	total_bytes = (uint64_t)generations * CHUNK;

	region = malloc((size_t)NPAGES * PAGE);
	gen = malloc(NPAGES * sizeof *gen);
	ring = malloc(RING);
	if (!region || !gen || !ring)
		fail("out of memory");
	for (uint32_t i = 0; i < NPAGES; i++) {
		fill_page((uint64_t *)(region + (size_t)i * PAGE), i, 0);
		gen[i] = 0;
		checksum = mix64(checksum ^ ((uint64_t)i << 32));
		pages_written++;
	}
	memset(ring, 0, RING);
	r8_replace(++r8_remaps);
	main_thread = pthread_self();
	signal_word = calloc(1, sizeof *signal_word);
	stack_t alt = {.ss_sp = malloc(ALTSTACK), .ss_size = ALTSTACK};
	struct sigaction sa = {.sa_handler = on_usr1, .sa_flags = SA_RESTART | SA_ONSTACK};
	if (!signal_word || !alt.ss_sp || sigaltstack(&alt, NULL) || sigaction(SIGUSR1, &sa, NULL))
		fail("signal setup: %s", strerror(errno));
	if (pipe(pipe_fd))
		fail("pipe: %s", strerror(errno));
	if ((e = pthread_create(&t_feed, NULL, feeder, NULL)))
		fail("pthread_create (feeder): %s", strerror(e));
	printf("pattern: %d pages of %d bytes, %d generations of %d pages, checks every %d%s\n",
	       NPAGES, PAGE, generations, PER_GEN, CHECK_EVERY, selftest ? " (selftest)" : "");
	ready();

	for (int g = 1; g <= generations; g++) {
		if (g == generations / 2 + 1)
			phase2();
		for (uint32_t j = 0; j < PER_GEN; j++)
			write_page(pick((uint32_t)g, j, 0), (uint32_t)g);
		read_chunk();
		if (g % THREAD_EVERY == 0) {
			struct burst b = {(uint32_t)g};
			pthread_t t;
			void *ret;

			if ((e = pthread_create(&t, NULL, burst_thread, &b)))
				fail("pthread_create (burst %d): %s", g, strerror(e));
			if ((e = pthread_join(t, &ret)))
				fail("pthread_join (burst %d): %s", g, strerror(e));
			if (ret != (void *)(intptr_t)0xb0057)
				fail("burst thread %d returned %p", g, ret);
		}
		if (g % REMAP_EVERY == 0)
			r8_replace(++r8_remaps);
		printf("generation %4d: %llu pages written, checksum %016llx\n", g,
		       (unsigned long long)pages_written, (unsigned long long)checksum);
		if (g % CHECK_EVERY == 0 || g == generations) {
			if (selftest && g == generations / 2 / CHECK_EVERY * CHECK_EVERY) {
				/* What a torn image would leave: content newer than gen[] says. */
				fill_page((uint64_t *)(region + (size_t)SELFTEST_PAGE * PAGE),
					  SELFTEST_PAGE, gen[SELFTEST_PAGE] + 1);
			}
			check(g);
		}
	}

	if ((e = pthread_join(t_feed, NULL)))
		fail("pthread_join (feeder): %s", strerror(e));
	char extra;
	ssize_t n;
	while ((n = read(pipe_fd[0], &extra, 1)) < 0 && errno == EINTR)
		;
	if (n != 0)
		fail("the pipe holds more than the feeder wrote");
	printf("pipe: %llu bytes, 8 MiB region mapped %u times, %llu pages written\n",
	       (unsigned long long)pipe_bytes, r8_remaps, (unsigned long long)pages_written);
	pass();
	return 0;
}
