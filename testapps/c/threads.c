/*
 * threads: many threads in every state a checkpoint can catch them in, with output that does not
 * depend on scheduling.
 *
 *   main        feeds a work queue batch by batch and waits on a condvar for each batch
 *   8 workers   take items from the queue (mutex + condvar), compute results stored by index
 *   feeder      writes an 8-byte record into a pipe every 4 ms (nanosleep, EINTR-safe)
 *   reader      blocked in read() on that pipe, checksums what arrives
 *   sleeper     250 naps of 5 ms; an interrupted nap continues with the remaining time
 *   ping, pong  hand a token back and forth through one mutex and condvar
 *   waiter      blocked on a condvar until main opens the gate at the very end
 *   spawner     creates and joins short-lived threads, one every 3 ms
 *
 * Usage: threads [BATCHES]     (default 48, about 1.5 s here)
 */
#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

#define WORKERS 8
#define BATCH 64
#define MAX_BATCHES 400
#define GROUP 8
#define FEED_RECORDS 300
#define NAPS 250
#define PINGPONGS 4000
#define SPAWNS 300

static uint64_t results[MAX_BATCHES * BATCH];

static pthread_mutex_t q_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t q_nonempty = PTHREAD_COND_INITIALIZER;
static pthread_cond_t q_batch_done = PTHREAD_COND_INITIALIZER;
static int q_next, q_end, q_done, q_closed;

static pthread_mutex_t pp_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pp_cond = PTHREAD_COND_INITIALIZER;
static int pp_turn, pp_count;
static uint64_t pp_token = 1;

static pthread_mutex_t gate_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t gate_cond = PTHREAD_COND_INITIALIZER;
static int gate_open;

static int pipe_fd[2];

static uint64_t work(uint64_t item)
{
	uint64_t x = item, n = 80000 + mix64(item) % 80000;

	for (uint64_t k = 0; k < n; k++)
		x = mix64(x + k);
	return x;
}

static void lock(pthread_mutex_t *m)
{
	int e = pthread_mutex_lock(m);

	if (e)
		fail("pthread_mutex_lock: %s", strerror(e));
}

static void unlock(pthread_mutex_t *m)
{
	int e = pthread_mutex_unlock(m);

	if (e)
		fail("pthread_mutex_unlock: %s", strerror(e));
}

static void *worker(void *arg)
{
	(void)arg;
	lock(&q_lock);
	for (;;) {
		while (q_next == q_end && !q_closed)
			pthread_cond_wait(&q_nonempty, &q_lock);
		if (q_next == q_end)
			break;
		int item = q_next++;
		unlock(&q_lock);
		uint64_t r = work((uint64_t)item);
		lock(&q_lock);
		results[item] = r;
		if (++q_done == q_end)
			pthread_cond_signal(&q_batch_done);
	}
	unlock(&q_lock);
	return NULL;
}

/* nanosleep that sleeps the whole interval even when signals interrupt it. */
static void nap(long ns)
{
	struct timespec req = {0, ns}, rem;

	while (nanosleep(&req, &rem) == -1) {
		if (errno != EINTR)
			fail("nanosleep: %s", strerror(errno));
		req = rem;
	}
}

static uint64_t record(int k) { return mix64(0xfeed0000u + (uint64_t)k); }

static void *feeder(void *arg)
{
	(void)arg;
	for (int k = 0; k < FEED_RECORDS; k++) {
		uint64_t rec = record(k);
		const char *p = (const char *)&rec;
		size_t left = sizeof rec;

		nap(4 * 1000 * 1000);
		while (left) {
			ssize_t n = write(pipe_fd[1], p, left);

			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0)
				fail("write to pipe: %s", strerror(errno));
			p += n;
			left -= (size_t)n;
		}
	}
	close(pipe_fd[1]);
	return NULL;
}

static uint64_t reader_sum, reader_bytes;

static void *reader(void *arg)
{
	unsigned char buf[64];

	(void)arg;
	for (;;) {
		ssize_t n = read(pipe_fd[0], buf, sizeof buf);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			fail("read from pipe: %s", strerror(errno));
		if (n == 0)
			break;
		for (ssize_t i = 0; i < n; i++, reader_bytes++)
			reader_sum = reader_sum * 31 + buf[i];
	}
	close(pipe_fd[0]);
	return NULL;
}

static int naps_done;

static void *sleeper(void *arg)
{
	(void)arg;
	for (int i = 0; i < NAPS; i++) {
		nap(5 * 1000 * 1000);
		naps_done++;
	}
	return NULL;
}

static void *pingpong(void *arg)
{
	int me = (int)(intptr_t)arg;

	lock(&pp_lock);
	while (pp_count < PINGPONGS) {
		while (pp_turn != me && pp_count < PINGPONGS)
			pthread_cond_wait(&pp_cond, &pp_lock);
		if (pp_count >= PINGPONGS)
			break;
		pp_token = mix64(pp_token ^ (uint64_t)me);
		pp_count++;
		pp_turn = !me;
		pthread_cond_broadcast(&pp_cond);
	}
	unlock(&pp_lock);
	return NULL;
}

static void *waiter(void *arg)
{
	(void)arg;
	lock(&gate_lock);
	while (!gate_open)
		pthread_cond_wait(&gate_cond, &gate_lock);
	unlock(&gate_lock);
	return (void *)(intptr_t)0x600d;
}

static void *transient(void *arg)
{
	uint64_t x = (uint64_t)(intptr_t)arg;

	for (int k = 0; k < 2000; k++)
		x = mix64(x);
	return (void *)(intptr_t)(x & 0xffffff);
}

static uint64_t spawn_sum;

static void *spawner(void *arg)
{
	(void)arg;
	for (int i = 0; i < SPAWNS; i++) {
		pthread_t t;
		void *ret;
		int e = pthread_create(&t, NULL, transient, (void *)(intptr_t)i);

		if (e)
			fail("pthread_create (transient %d): %s", i, strerror(e));
		if ((e = pthread_join(t, &ret)))
			fail("pthread_join (transient %d): %s", i, strerror(e));
		spawn_sum += (uint64_t)(intptr_t)ret;
		nap(3 * 1000 * 1000);
	}
	return NULL;
}

static pthread_t start(void *(*fn)(void *), void *arg, const char *what)
{
	pthread_t t;
	int e = pthread_create(&t, NULL, fn, arg);

	if (e)
		fail("pthread_create (%s): %s", what, strerror(e));
	return t;
}

static void *join(pthread_t t, const char *what)
{
	void *ret;
	int e = pthread_join(t, &ret);

	if (e)
		fail("pthread_join (%s): %s", what, strerror(e));
	return ret;
}

int main(int argc, char **argv)
{
	int batches = argc > 1 ? atoi(argv[1]) : 48;
	pthread_t workers[WORKERS], t_feed, t_read, t_sleep, t_ping, t_pong, t_wait, t_spawn;

	if (batches < 2 || batches > MAX_BATCHES)
		fail("batches must be in 2..%d", MAX_BATCHES);
	if (pipe(pipe_fd))
		fail("pipe: %s", strerror(errno));
	for (int i = 0; i < WORKERS; i++)
		workers[i] = start(worker, NULL, "worker");
	t_read = start(reader, NULL, "reader");
	t_feed = start(feeder, NULL, "feeder");
	t_sleep = start(sleeper, NULL, "sleeper");
	t_ping = start(pingpong, (void *)0, "ping");
	t_pong = start(pingpong, (void *)1, "pong");
	t_wait = start(waiter, NULL, "waiter");
	t_spawn = start(spawner, NULL, "spawner");
	printf("threads: %d workers, %d batches of %d items\n", WORKERS, batches, BATCH);
	ready();

	for (int b = 0; b < batches; b++) {
		uint64_t chain = 0, x = 0;

		if (b == batches / 2)
			phase2();
		lock(&q_lock);
		q_end = (b + 1) * BATCH;
		pthread_cond_broadcast(&q_nonempty);
		while (q_done != q_end)
			pthread_cond_wait(&q_batch_done, &q_lock);
		unlock(&q_lock);
		/* Combined by index, so the order in which workers finished does not matter. */
		for (int g = 0; g < BATCH; g += GROUP) {
			uint64_t h = 0;

			for (int i = b * BATCH + g; i < b * BATCH + g + GROUP; i++)
				h = mix64(h ^ results[i]);
			printf("batch %3d group %2d: %016llx\n", b, g / GROUP, (unsigned long long)h);
			chain = mix64(chain ^ h);
		}
		for (int i = b * BATCH; i < (b + 1) * BATCH; i++)
			x ^= results[i];
		printf("batch %3d: items %5d..%5d xor %016llx chain %016llx\n", b, b * BATCH,
		       (b + 1) * BATCH - 1, (unsigned long long)x, (unsigned long long)chain);
	}

	lock(&q_lock);
	q_closed = 1;
	pthread_cond_broadcast(&q_nonempty);
	unlock(&q_lock);
	for (int i = 0; i < WORKERS; i++)
		join(workers[i], "worker");
	join(t_feed, "feeder");
	join(t_read, "reader");
	join(t_sleep, "sleeper");
	join(t_ping, "ping");
	join(t_pong, "pong");
	join(t_spawn, "spawner");
	lock(&gate_lock);
	gate_open = 1;
	pthread_cond_signal(&gate_cond);
	unlock(&gate_lock);
	if (join(t_wait, "waiter") != (void *)(intptr_t)0x600d)
		fail("waiter returned the wrong value");

	/* Verify: a sample of results recomputed here, everything the helpers counted. */
	for (int i = 0; i < batches * BATCH; i += 7)
		if (results[i] != work((uint64_t)i))
			fail("result %d is wrong", i);
	uint64_t want_sum = 0;
	for (int k = 0; k < FEED_RECORDS; k++) {
		uint64_t rec = record(k);
		const unsigned char *p = (const unsigned char *)&rec;

		for (size_t i = 0; i < sizeof rec; i++)
			want_sum = want_sum * 31 + p[i];
	}
	if (reader_bytes != FEED_RECORDS * 8 || reader_sum != want_sum)
		fail("pipe delivered %llu bytes, checksum %016llx (want %d, %016llx)",
		     (unsigned long long)reader_bytes, (unsigned long long)reader_sum,
		     FEED_RECORDS * 8, (unsigned long long)want_sum);
	if (naps_done != NAPS)
		fail("sleeper took %d naps, not %d", naps_done, NAPS);
	if (pp_count != PINGPONGS)
		fail("ping-pong stopped at %d", pp_count);
	printf("pipe: %llu bytes, checksum %016llx\n", (unsigned long long)reader_bytes,
	       (unsigned long long)reader_sum);
	printf("sleeper: %d naps\n", naps_done);
	printf("ping-pong: %d exchanges, token %016llx\n", pp_count, (unsigned long long)pp_token);
	printf("spawner: %d threads, sum %016llx\n", SPAWNS, (unsigned long long)spawn_sum);
	pass();
	return 0;
}
