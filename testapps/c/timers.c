/*
 * timers: POSIX timers and pending signals across checkpoints and restores.
 *
 * Four timers (IDs printed): A, CLOCK_MONOTONIC, periodic, SIGEV_SIGNAL with a value, counted by
 * the main thread with sigwaitinfo; B, CLOCK_MONOTONIC, periodic, SIGEV_THREAD_ID at the worker
 * thread, counted there; C, CLOCK_REALTIME, one-shot in an hour, SIGEV_SIGNAL; D, SIGEV_NONE,
 * one-shot in an hour with a 7 s interval; E, CLOCK_MONOTONIC, periodic, its signal blocked and
 * never waited for: exactly one stays pending (a timer's signal is queued once, the rest are
 * overruns); F, CLOCK_REALTIME, SIGEV_NONE, set absolute an hour ahead: at the end its
 * deadline must not have moved by the wall-clock time the program spent away (a restore
 * that re-armed it relative would move it by that much). Signals blocked and pending from the start: SIGUSR1
 * (kill) and two SIGRTMIN+1 with sigqueue values for the process; SIGUSR2 (pthread_kill) and
 * SIGRTMIN+2 with a value for the worker. At the end: each tick's siginfo was right, C and D
 * still armed as set, every pending signal still there with its siginfo, in order, and every
 * timer deletes cleanly.
 *
 * Usage: timers [TICKS]   (default 150 ticks of 10 ms)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

#define SIG_A (SIGRTMIN + 3)
#define SIG_B (SIGRTMIN + 4)
#define SIG_E (SIGRTMIN + 5)
#define HOUR 3600

static int ticks = 150;
static timer_t ta, tb, tc, td, te, tf;
static char worker_report[512];

static void make_timer(timer_t *t, clockid_t clock, int notify, int sig, int value, pid_t tid)
{
	struct sigevent ev;

	memset(&ev, 0, sizeof ev);
	ev.sigev_notify = notify;
	ev.sigev_signo = sig;
	ev.sigev_value.sival_int = value;
	ev._sigev_un._tid = tid;
	if (timer_create(clock, &ev, t) != 0)
		fail("timer_create: %s", strerror(errno));
}

static void arm(timer_t t, long value_ms, long interval_ms)
{
	struct itimerspec s = {
		.it_interval = { interval_ms / 1000, interval_ms % 1000 * 1000000 },
		.it_value = { value_ms / 1000, value_ms % 1000 * 1000000 },
	};
	if (timer_settime(t, 0, &s, NULL) != 0)
		fail("timer_settime: %s", strerror(errno));
}

/* Takes one pending signal `sig` without waiting; checks its code and value. */
static void take(int sig, int code, int value, const char *who, char *out, size_t cap)
{
	sigset_t s;
	siginfo_t si;
	struct timespec zero = { 0, 0 };

	sigemptyset(&s);
	sigaddset(&s, sig);
	if (sigtimedwait(&s, &si, &zero) != sig)
		fail("%s: signal %d no longer pending", who, sig);
	/* kill and tgkill: the code is the kernel's to choose (SI_USER or SI_TKILL), the same in
	 * every run; the sender is this process. */
	if ((code == SI_QUEUE && (si.si_code != SI_QUEUE || si.si_value.sival_int != value)) ||
	    si.si_pid != getpid())
		fail("%s: signal %d came back with code %d value %d from %d", who, sig, si.si_code,
		     si.si_value.sival_int, si.si_pid);
	snprintf(out + strlen(out), cap - strlen(out), "%s pending %s%d code %d value %d\n", who,
		 sig >= SIGRTMIN ? "RTMIN+" : "", sig - (sig >= SIGRTMIN ? SIGRTMIN : 0), si.si_code,
		 code == SI_QUEUE ? value : 0);
}

static void wait_ticks(int sig, timer_t t, int value, const char *who)
{
	sigset_t s;
	siginfo_t si;

	sigemptyset(&s);
	sigaddset(&s, sig);
	for (int i = 0; i < ticks; i++) {
		if (sigwaitinfo(&s, &si) != sig)
			fail("%s: sigwaitinfo: %s", who, strerror(errno));
		if (si.si_code != SI_TIMER || si.si_value.sival_int != value ||
		    si.si_timerid != (int)(intptr_t)t)
			fail("%s: tick %d code %d value %d timer %d", who, i, si.si_code,
			     si.si_value.sival_int, si.si_timerid);
		if (sig == SIG_A && i % 10 == 0)
			printf("%s tick %d\n", who, i);
		if (sig == SIG_A && i == ticks / 2)
			phase2();
	}
}

static int tid_pipe[2]; /* the worker says its TID */
static int go_pipe[2];  /* then waits until its timer exists */

static void *worker(void *arg)
{
	pid_t me = gettid();

	(void)arg;
	if (write(tid_pipe[1], &me, sizeof me) != sizeof me)
		fail("write: %s", strerror(errno));
	if (read(go_pipe[0], &me, 1) != 1)
		fail("read: %s", strerror(errno));
	wait_ticks(SIG_B, tb, 0xb0b, "worker");
	take(SIGUSR2, SI_TKILL, 0, "worker", worker_report, sizeof worker_report);
	take(SIGRTMIN + 2, SI_QUEUE, 202, "worker", worker_report, sizeof worker_report);
	return NULL;
}

static void check_long(timer_t t, const char *name, long interval_s)
{
	struct itimerspec s;

	if (timer_gettime(t, &s) != 0)
		fail("timer_gettime %s: %s", name, strerror(errno));
	if (s.it_value.tv_sec <= 0 || s.it_value.tv_sec >= HOUR || s.it_interval.tv_sec != interval_s)
		fail("timer %s: %ld s left, interval %ld s", name, (long)s.it_value.tv_sec,
		     (long)s.it_interval.tv_sec);
	printf("timer %s armed, interval %ld s\n", name, interval_s);
}

static long long ns(struct timespec t)
{
	return t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* CLOCK_REALTIME minus CLOCK_MONOTONIC: grows by the time the program spent away (in a
 * restore's time namespace CLOCK_MONOTONIC goes on from the checkpoint). */
static long long wall_offset(void)
{
	struct timespec rt, mono;

	clock_gettime(CLOCK_REALTIME, &rt);
	clock_gettime(CLOCK_MONOTONIC, &mono);
	return ns(rt) - ns(mono);
}

/* Timer F's deadline, `deadline` ns on CLOCK_REALTIME, is where it was, give or take 5 ms,
 * whatever the time spent away (`away` ns: half of it is allowed too, so that a time away
 * of a few ms cannot fail it). */
static void check_deadline(timer_t t, long long deadline, long long away)
{
	struct itimerspec s;
	struct timespec rt;

	if (timer_gettime(t, &s) != 0 || clock_gettime(CLOCK_REALTIME, &rt) != 0)
		fail("timer_gettime F: %s", strerror(errno));
	long long moved = ns(rt) + ns(s.it_value) - deadline;
	if (llabs(moved) > 5000000 + away / 2)
		fail("timer F: its deadline moved by %lld ms (the program was away %lld ms)",
		     moved / 1000000, away / 1000000);
	printf("timer F keeps its deadline\n");
}

/* Timer E's signal: pending exactly once, from the timer. */
static void timer_once(timer_t t)
{
	sigset_t s;
	siginfo_t si;
	struct timespec zero = { 0, 0 };

	sigemptyset(&s);
	sigaddset(&s, SIG_E);
	if (sigtimedwait(&s, &si, &zero) != SIG_E)
		fail("timer E: no signal pending");
	if (si.si_code != SI_TIMER || si.si_value.sival_int != 0xe0e ||
	    si.si_timerid != (int)(intptr_t)t)
		fail("timer E: code %d value %d timer %d", si.si_code, si.si_value.sival_int,
		     si.si_timerid);
	if (sigtimedwait(&s, &si, &zero) != -1 || errno != EAGAIN)
		fail("timer E: its signal was pending more than once");
	printf("timer E pending once\n");
}

int main(int argc, char **argv)
{
	sigset_t all;
	pthread_t w;
	pid_t wtid = 0;
	char report[512] = "";

	if (argc > 1)
		ticks = atoi(argv[1]);
	sigemptyset(&all);
	for (int s = SIGRTMIN + 1; s <= SIGRTMIN + 5; s++)
		sigaddset(&all, s);
	sigaddset(&all, SIGUSR1);
	sigaddset(&all, SIGUSR2);
	sigaddset(&all, SIGALRM);
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	if (pipe(tid_pipe) != 0 || pipe(go_pipe) != 0 || pthread_create(&w, NULL, worker, NULL) != 0)
		fail("pipe or pthread_create: %s", strerror(errno));
	if (read(tid_pipe[0], &wtid, sizeof wtid) != sizeof wtid)
		fail("read: %s", strerror(errno));

	make_timer(&ta, CLOCK_MONOTONIC, SIGEV_SIGNAL, SIG_A, 0xa0a, 0);
	make_timer(&tb, CLOCK_MONOTONIC, SIGEV_THREAD_ID, SIG_B, 0xb0b, wtid);
	make_timer(&tc, CLOCK_REALTIME, SIGEV_SIGNAL, SIGALRM, 0xc0c, 0);
	make_timer(&td, CLOCK_MONOTONIC, SIGEV_NONE, 0, 0, 0);
	make_timer(&te, CLOCK_MONOTONIC, SIGEV_SIGNAL, SIG_E, 0xe0e, 0);
	make_timer(&tf, CLOCK_REALTIME, SIGEV_NONE, 0, 0, 0);
	printf("timer ids %d %d %d %d %d\n", (int)(intptr_t)ta, (int)(intptr_t)tb,
	       (int)(intptr_t)tc, (int)(intptr_t)td, (int)(intptr_t)te);

	kill(getpid(), SIGUSR1);
	sigqueue(getpid(), SIGRTMIN + 1, (union sigval){ .sival_int = 101 });
	sigqueue(getpid(), SIGRTMIN + 1, (union sigval){ .sival_int = 102 });
	syscall(SYS_tgkill, getpid(), wtid, SIGUSR2);
	pthread_sigqueue(w, SIGRTMIN + 2, (union sigval){ .sival_int = 202 });

	if (write(go_pipe[1], "g", 1) != 1)
		fail("write: %s", strerror(errno));
	arm(tc, HOUR * 1000L, 0);
	arm(td, HOUR * 1000L, 7000);
	arm(te, 5, 5);
	arm(ta, 10, 10);
	arm(tb, 10, 10);
	struct timespec now;
	clock_gettime(CLOCK_REALTIME, &now);
	struct itimerspec at = { { 0, 0 }, { now.tv_sec + HOUR, now.tv_nsec } };
	long long deadline = ns(at.it_value), offset = wall_offset();
	if (timer_settime(tf, TIMER_ABSTIME, &at, NULL) != 0)
		fail("timer_settime F: %s", strerror(errno));
	ready();
	wait_ticks(SIG_A, ta, 0xa0a, "main");
	pthread_join(w, NULL);

	check_long(tc, "C", 0);
	check_long(td, "D", 7);
	check_deadline(tf, deadline, wall_offset() - offset);
	take(SIGUSR1, SI_USER, 0, "main", report, sizeof report);
	take(SIGRTMIN + 1, SI_QUEUE, 101, "main", report, sizeof report);
	take(SIGRTMIN + 1, SI_QUEUE, 102, "main", report, sizeof report);
	timer_once(te);
	printf("%s%s", report, worker_report);
	if (timer_delete(ta) || timer_delete(tb) || timer_delete(tc) || timer_delete(td) ||
	    timer_delete(te) || timer_delete(tf))
		fail("timer_delete: %s", strerror(errno));
	pass();
	return 0;
}
