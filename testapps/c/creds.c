/*
 * creds: a program started as root that drops to nobody (65534) while its threads run, the
 * way memcached -u or nginx do: setgroups, setresgid and setresuid through glibc, which makes
 * the change in every thread (its SIGSETXID broadcast, which reaches the shim's helper too).
 * Four workers compute the whole time and compare their own credentials (raw system calls:
 * credentials are per thread in the kernel) with what the program set, so a thread restored
 * with other credentials is caught. In `mixed` mode nothing goes through glibc: worker 1 alone
 * drops to nobody with raw system calls (setgroups, setresgid, setresuid), as setpriv-like
 * code does, and the other threads stay root, so the threads' credentials differ.
 *
 * Usage: creds [ROUNDS] [MODE]     (default 3000 rounds, about 1.5 s here; MODE: same
 * (default) or mixed)
 * Must run as root. READY is printed once the credentials are dropped. stdout holds the
 * progress and, at the end, each thread's credentials as it reads them itself and as
 * /proc/thread-self/status shows them (the same in every run).
 */
#define _GNU_SOURCE
#include <grp.h>
#include <pthread.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "common.h"

#define WORKERS 4
#define NOBODY 65534

static volatile int dropped, stop;
static char at_start[200];
static int mixed;
static char problem[WORKERS + 1][480];
static char final[WORKERS + 1][200];
static char status[WORKERS + 1][400];

/* The Uid, Gid and Groups lines of /proc/thread-self/status, joined by " | ". */
static void status_of_thread(char *out, size_t n)
{
	char line[256];
	size_t k = 0;
	FILE *f = fopen("/proc/thread-self/status", "r");

	out[0] = 0;
	if (!f) {
		snprintf(out, n, "cannot open /proc/thread-self/status");
		return;
	}
	while (fgets(line, sizeof line, f) && k < n) {
		if (strncmp(line, "Uid:", 4) && strncmp(line, "Gid:", 4) && strncmp(line, "Groups:", 7))
			continue;
		line[strcspn(line, "\n")] = 0;
		k += snprintf(out + k, n - k, "%s%s", k ? " | " : "", line);
	}
	fclose(f);
}

/* This thread's credentials, from the kernel (not glibc's cache: there is none). */
static void creds_of_thread(char *out, size_t n)
{
	uid_t r, e, s;
	gid_t gr, ge, gs;
	gid_t groups[16];

	syscall(SYS_getresuid, &r, &e, &s);
	syscall(SYS_getresgid, &gr, &ge, &gs);
	long ng = syscall(SYS_getgroups, 16, groups);
	int k = snprintf(out, n, "uid %u %u %u gid %u %u %u groups", r, e, s, gr, ge, gs);
	for (long i = 0; i < ng && k < (int)n; i++)
		k += snprintf(out + k, n - k, " %u", groups[i]);
}

/* What thread `self` must hold once the program has changed credentials. */
static void expected(int self, char *out, size_t n)
{
	if (mixed && self != 1)
		snprintf(out, n, "%s", at_start);
	else
		snprintf(out, n, "uid %u %u %u gid %u %u %u groups %u", NOBODY, NOBODY, NOBODY,
			 NOBODY, NOBODY, NOBODY, NOBODY);
}

/* Drops the calling thread alone to nobody. */
static void drop_this_thread(char *problem_out, size_t n)
{
	gid_t nobody = NOBODY;

	if (syscall(SYS_setgroups, 1, &nobody) != 0 ||
	    syscall(SYS_setresgid, NOBODY, NOBODY, NOBODY) != 0 ||
	    syscall(SYS_setresuid, NOBODY, NOBODY, NOBODY) != 0)
		snprintf(problem_out, n, "raw credential change: %m");
}

static void check(int self)
{
	char have[200], want[200];

	if (problem[self][0] || !dropped)
		return;
	expected(self, want, sizeof want);
	creds_of_thread(have, sizeof have);
	if (strcmp(have, want) != 0)
		snprintf(problem[self], sizeof problem[self], "thread %d has \"%s\", not \"%s\"", self,
			 have, want);
}

static void *worker(void *arg)
{
	int self = (int)(intptr_t)arg;
	uint64_t x = (uint64_t)self;

	while (!stop) {
		if (mixed && self == 1 && !dropped) {
			drop_this_thread(problem[self], sizeof problem[self]);
			dropped = 1;
		}
		for (int i = 0; i < 20000; i++)
			x = mix64(x);
		check(self);
	}
	creds_of_thread(final[self], sizeof final[self]);
	status_of_thread(status[self], sizeof status[self]);
	return (void *)(uintptr_t)x;
}

int main(int argc, char **argv)
{
	int rounds = argc > 1 ? atoi(argv[1]) : 3000;
	pthread_t t[WORKERS + 1];
	gid_t nobody = NOBODY;
	uint64_t x = 7;

	mixed = argc > 2 && strcmp(argv[2], "mixed") == 0;
	if (geteuid() != 0)
		fail("must be started as root");
	creds_of_thread(at_start, sizeof at_start);
	for (int i = 1; i <= WORKERS; i++)
		if (pthread_create(&t[i], NULL, worker, (void *)(intptr_t)i) != 0)
			fail("pthread_create");
	if (!mixed) {
		if (setgroups(1, &nobody) != 0)
			fail("setgroups: %m");
		if (setresgid(NOBODY, NOBODY, NOBODY) != 0)
			fail("setresgid: %m");
		if (setresuid(NOBODY, NOBODY, NOBODY) != 0)
			fail("setresuid: %m");
		dropped = 1;
	}
	while (!dropped)
		sched_yield();
	int dumpable = prctl(PR_GET_DUMPABLE);
	ready();
	for (int r = 0; r < rounds; r++) {
		for (int i = 0; i < 40000; i++)
			x = mix64(x);
		check(0);
		printf("round %d %016llx\n", r, (unsigned long long)x);
		if (r == rounds / 2)
			phase2();
	}
	stop = 1;
	for (int i = 1; i <= WORKERS; i++)
		pthread_join(t[i], NULL);
	creds_of_thread(final[0], sizeof final[0]);
	status_of_thread(status[0], sizeof status[0]);
	for (int i = 0; i <= WORKERS; i++)
		if (problem[i][0])
			fail("%s", problem[i]);
	if (prctl(PR_GET_DUMPABLE) != dumpable)
		fail("dumpable was %d after the drop, is %d now", dumpable, prctl(PR_GET_DUMPABLE));
	for (int i = 0; i <= WORKERS; i++)
		printf("thread %d: %s\n", i,
		       strcmp(final[i], at_start) == 0 ? "as at the start" : final[i]);
	for (int i = 0; i <= WORKERS; i++)
		if (strcmp(final[i], at_start) != 0)
			printf("thread %d status: %s\n", i, status[i]);
	pass();
	return 0;
}
