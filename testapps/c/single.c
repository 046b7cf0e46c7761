/*
 * single: one thread, a 64 MiB malloc'd array rewritten densely every round (so a checkpoint
 * always lands on memory being modified), and a brk heap of thousands of small allocations that
 * are freed and reallocated all the time (so checkpoints land inside malloc).
 *
 * Usage: single [ROUNDS]      (default 72, about 1.4 s here)
 */
#include <string.h>
#include <sys/stat.h>

#include "common.h"

#define WORDS (8u << 20) /* 64 MiB of uint64_t */
#define MASK (WORDS - 1)
#define NODES 20000
#define CHURN 1500
#define PARTS 8
#define MAX_ROUNDS 1000

struct node {
	uint32_t id;
	uint32_t gen;
	uint32_t len;
	char text[];
};

/* .bss and .data that change while the program runs. */
static struct node *nodes[NODES];
static uint64_t round_sums[MAX_ROUNDS];
static uint64_t salt = 0x5eed5eed5eed5eedULL;

static char text_char(uint32_t id, uint32_t gen, uint32_t i)
{
	return (char)('a' + mix64(((uint64_t)id << 40) ^ ((uint64_t)gen << 20) ^ i) % 26);
}

static struct node *make_node(uint32_t id, uint32_t gen)
{
	uint32_t len = 8 + (uint32_t)(mix64(((uint64_t)id << 32) | gen) % 180);
	struct node *n = malloc(sizeof *n + len + 1);

	if (!n)
		fail("malloc of node %u failed", id);
	n->id = id;
	n->gen = gen;
	n->len = len;
	for (uint32_t i = 0; i < len; i++)
		n->text[i] = text_char(id, gen, i);
	n->text[len] = 0;
	return n;
}

static int node_ok(const struct node *n, uint32_t id)
{
	if (n->id != id || strlen(n->text) != n->len)
		return 0;
	for (uint32_t i = 0; i < n->len; i++)
		if (n->text[i] != text_char(id, n->gen, i))
			return 0;
	return 1;
}

int main(int argc, char **argv)
{
	int rounds = argc > 1 ? atoi(argv[1]) : 72;
	uint64_t *a = malloc(WORDS * sizeof *a);
	uint64_t sum = 0;

	if (rounds < 2 || rounds > MAX_ROUNDS)
		fail("rounds must be in 2..%d", MAX_ROUNDS);
	if (!a)
		fail("cannot allocate the array");
	umask(0027);
	for (uint32_t i = 0; i < WORDS; i++)
		a[i] = mix64(i);
	for (uint32_t id = 0; id < NODES; id++)
		nodes[id] = make_node(id, 0);
	printf("single: %u words, %d nodes, %d rounds\n", WORDS, NODES, rounds);
	ready();

	for (int r = 0; r < rounds; r++) {
		uint64_t heap = 0;

		if (r == rounds / 2)
			phase2();
		sum = 0;
		for (uint32_t part = 0; part < PARTS; part++) {
			uint32_t end = (part + 1) * (WORDS / PARTS);

			for (uint32_t i = part * (WORDS / PARTS); i < end; i++) {
				a[i] = mix64(a[i] ^ a[(i + 1021) & MASK] ^ (uint64_t)r ^ salt);
				sum += a[i];
			}
			printf("round %3d part %u: %016llx\n", r, part, (unsigned long long)sum);
		}
		for (uint32_t k = 0; k < CHURN; k++) {
			uint32_t id = (uint32_t)(mix64((uint64_t)r * CHURN + k) % NODES);

			free(nodes[id]);
			nodes[id] = make_node(id, (uint32_t)r + 1);
			heap = mix64(heap ^ nodes[id]->len ^ (uint64_t)nodes[id]->text[0]);
		}
		round_sums[r] = sum;
		salt = mix64(salt ^ sum);
		printf("round %3d heap: %016llx salt: %016llx\n", r, (unsigned long long)heap,
		       (unsigned long long)salt);
	}

	/* Verify: the array still sums to what the last round computed while writing it, every
	 * node is intact, and the per-round history in .bss is complete. */
	uint64_t check = 0, history = 0;
	for (uint32_t i = 0; i < WORDS; i++)
		check += a[i];
	if (check != sum)
		fail("array checksum %016llx, last round wrote %016llx", (unsigned long long)check,
		     (unsigned long long)sum);
	for (uint32_t id = 0; id < NODES; id++)
		if (!node_ok(nodes[id], id))
			fail("heap node %u is damaged", id);
	for (int r = 0; r < rounds; r++) {
		if (!round_sums[r])
			fail("round %d left no trace", r);
		history = mix64(history ^ round_sums[r]);
	}
	if (umask(0027) != 0027)
		fail("umask changed");
	printf("final: array %016llx history %016llx\n", (unsigned long long)check,
	       (unsigned long long)history);
	for (uint32_t id = 0; id < NODES; id++)
		free(nodes[id]);
	free(a);
	pass();
	return 0;
}
