/*
 * ids: the process's PID, its threads' TIDs and its clocks, as the program itself sees them.
 * The main thread and 4 workers remember getpid()/gettid() at the start and compare them all
 * the time; every thread reads CLOCK_MONOTONIC and CLOCK_BOOTTIME (through the vDSO) over and
 * over, and each reading must not be below the one before. At the end: /proc/self must be this
 * process and /proc/self/task/<tid> every thread (a /proc of another PID namespace fails that).
 *
 * Usage: ids [ROUNDS] [MODE]      (default 120 rounds, about 1.5 s here)
 *   exact       (default) a changed PID or TID is a failure
 *   may-change  a changed PID or TID is only reported on stderr ("ids: changed"), so stdout
 *               stays the same: for restores that cannot keep them
 *   hold        like exact, then print WAITING on stderr and wait: SIGUSR1 exits with status
 *               42, anything else takes its default action
 * The raw numbers go to stderr only; stdout is the same in every run.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

#define WORKERS 4

static pid_t pid_at_start;
static pid_t tid_at_start[WORKERS + 1];
static volatile int stop;
static int may_change;
/* First problem seen by each thread (0: none). */
static char problem[WORKERS + 1][160];
static int ids_changed;

static pid_t tid(void) { return (pid_t)syscall(SYS_gettid); }

static uint64_t now(clockid_t c)
{
	struct timespec ts;

	clock_gettime(c, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

struct clocks {
	uint64_t mono, boot;
};

/* Reads both clocks; notes the first time one goes backwards or the IDs are not the ones of
 * the start. */
static void check(int self, struct clocks *last)
{
	uint64_t m = now(CLOCK_MONOTONIC), b = now(CLOCK_BOOTTIME);

	if (problem[self][0])
		return;
	if (m < last->mono)
		snprintf(problem[self], sizeof problem[self],
			 "thread %d: CLOCK_MONOTONIC went back by %llu ns", self,
			 (unsigned long long)(last->mono - m));
	else if (b < last->boot)
		snprintf(problem[self], sizeof problem[self],
			 "thread %d: CLOCK_BOOTTIME went back by %llu ns", self,
			 (unsigned long long)(last->boot - b));
	last->mono = m;
	last->boot = b;
	if (getpid() != pid_at_start || tid() != tid_at_start[self]) {
		if (!may_change && !problem[self][0])
			snprintf(problem[self], sizeof problem[self],
				 "thread %d: PID/TID was %d/%d, now %d/%d", self, pid_at_start,
				 tid_at_start[self], getpid(), tid());
		ids_changed = 1;
	}
}

static void *worker(void *arg)
{
	int self = (int)(intptr_t)arg;
	struct clocks last = {0, 0};
	uint64_t x = (uint64_t)self;

	tid_at_start[self] = tid();
	while (!stop) {
		for (int i = 0; i < 20000; i++)
			x = mix64(x);
		check(self, &last);
	}
	return (void *)(uintptr_t)x;
}

static void on_usr1(int sig)
{
	(void)sig;
	_exit(42);
}

/* /proc/self is this process, and /proc/self/task/<tid> exists for the calling thread. */
static void check_proc(void)
{
	char link[64], want[32], path[64];

	ssize_t n = readlink("/proc/self", link, sizeof link - 1);
	if (n < 0)
		fail("readlink /proc/self: %m");
	link[n] = 0;
	snprintf(want, sizeof want, "%d", getpid());
	if (strcmp(link, want) != 0)
		fail("/proc/self is %s, but getpid() is %s: /proc is not this PID namespace's", link,
		     want);
	for (int i = 0; i <= WORKERS; i++) {
		snprintf(path, sizeof path, "/proc/self/task/%d", tid_at_start[i]);
		if (access(path, F_OK) != 0 && !may_change)
			fail("%s does not exist (thread %d)", path, i);
	}
}

int main(int argc, char **argv)
{
	int rounds = argc > 1 ? atoi(argv[1]) : 120;
	const char *mode = argc > 2 ? argv[2] : "exact";
	int hold = strcmp(mode, "hold") == 0;
	pthread_t th[WORKERS + 1];
	struct clocks last = {0, 0};
	uint64_t x = 0;

	if (rounds < 2 || rounds > 100000)
		fail("rounds must be in 2..100000");
	if (!hold && strcmp(mode, "exact") != 0 && strcmp(mode, "may-change") != 0)
		fail("unknown mode %s", mode);
	may_change = strcmp(mode, "may-change") == 0;
	pid_at_start = getpid();
	tid_at_start[0] = tid();
	for (int i = 1; i <= WORKERS; i++)
		if (pthread_create(&th[i], NULL, worker, (void *)(intptr_t)i) != 0)
			fail("pthread_create failed");
	/* Every worker has its TID recorded before the first round. */
	for (int i = 1; i <= WORKERS; i++)
		while (__atomic_load_n(&tid_at_start[i], __ATOMIC_ACQUIRE) == 0)
			sched_yield();
	fprintf(stderr, "ids: pid %d, tids %d %d %d %d %d\n", pid_at_start, tid_at_start[0],
		tid_at_start[1], tid_at_start[2], tid_at_start[3], tid_at_start[4]);
	printf("ids: %d threads, %d rounds\n", WORKERS + 1, rounds);
	check_proc();
	ready();
	for (int r = 0; r < rounds; r++) {
		for (int k = 0; k < 50; k++) {
			for (int i = 0; i < 20000; i++)
				x = mix64(x ^ (uint64_t)r);
			check(0, &last);
		}
		printf("round %d: %016llx\n", r, (unsigned long long)x);
		if (r == rounds / 2)
			phase2();
	}
	check_proc();
	stop = 1;
	for (int i = 1; i <= WORKERS; i++)
		pthread_join(th[i], NULL);
	for (int i = 0; i <= WORKERS; i++)
		if (problem[i][0])
			fail("%s", problem[i]);
	fprintf(stderr, "ids: pid %d, main tid %d at the end: %s\n", getpid(), tid(),
		ids_changed ? "changed" : "unchanged");
	printf("ids: all checks passed\n");
	pass();
	if (hold) {
		signal(SIGUSR1, on_usr1);
		marker("WAITING");
		for (;;)
			pause();
	}
	return 0;
}
