/*
 * waits: threads blocked the whole time in the calls that a signal handler interrupts for
 * good (epoll_wait, epoll_pwait, poll, ppoll, select, pselect, nanosleep, clock_nanosleep
 * relative and absolute, usleep, sigtimedwait, sem_timedwait, pthread_cond_timedwait, a raw
 * futex wait with a relative and with an absolute timeout, pause, sigsuspend), each without a timeout (woken at the end) and with one (timing out again and
 * again), while the main thread computes. None of them may ever see EINTR, whatever
 * checkpoints and restores happen meanwhile: only the program's own SIGUSR1, sent at the end
 * to the pause and sigsuspend threads, may interrupt those two, and must.
 *
 * Usage: waits [ROUNDS] [no-epoll]     (default 3000 rounds, about 1.5 s here)
 *   no-epoll  leaves out the epoll waiters: for restores, while snapshim does not restore
 *             epoll descriptors (they come back as /dev/null, and epoll_wait fails on it)
 * stdout: progress, then one line per waiter (the same in every run), then PASS.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <string.h>
#include <sys/epoll.h>
#include <linux/futex.h>
#include <sys/select.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

/* A timed wait lasts this long, then starts again until the end. */
#define SLICE_MS 40

static int done_pipe[2]; /* readable at the end: wakes the untimed waiters */
static int epfd;
static sem_t never_posted;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t never_signalled = PTHREAD_COND_INITIALIZER;
static volatile sig_atomic_t stop, usr1_seen;
static int ack_pipe[2]; /* the pause/sigsuspend threads say they saw SIGUSR1 */

struct waiter {
	const char *name;
	/* One wait: returns 0 when it ended normally (event, timeout, or the end), -1 with
	 * errno set otherwise. */
	int (*wait)(int timed);
	int timed;
	pthread_t t;
	int skip;
	char problem[160];
};

static void on_usr1(int sig)
{
	(void)sig;
	usr1_seen = 1;
}

static struct timespec ms_ts(int ms)
{
	struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000};
	return ts;
}

static int r_or_errno(int r) { return r < 0 ? -1 : 0; }

static int w_epoll_wait(int timed)
{
	struct epoll_event ev;
	return r_or_errno(epoll_wait(epfd, &ev, 1, timed ? SLICE_MS : -1));
}

static int w_epoll_pwait(int timed)
{
	struct epoll_event ev;
	sigset_t none;
	sigemptyset(&none);
	return r_or_errno(epoll_pwait(epfd, &ev, 1, timed ? SLICE_MS : -1, &none));
}

static int w_poll(int timed)
{
	struct pollfd p = {done_pipe[0], POLLIN, 0};
	return r_or_errno(poll(&p, 1, timed ? SLICE_MS : -1));
}

static int w_ppoll(int timed)
{
	struct pollfd p = {done_pipe[0], POLLIN, 0};
	struct timespec ts = ms_ts(SLICE_MS);
	sigset_t none;
	sigemptyset(&none);
	return r_or_errno(ppoll(&p, 1, timed ? &ts : NULL, &none));
}

static int w_select(int timed)
{
	fd_set r;
	struct timeval tv = {0, SLICE_MS * 1000};
	FD_ZERO(&r);
	FD_SET(done_pipe[0], &r);
	return r_or_errno(select(done_pipe[0] + 1, &r, NULL, NULL, timed ? &tv : NULL));
}

static int w_pselect(int timed)
{
	fd_set r;
	struct timespec ts = ms_ts(SLICE_MS);
	sigset_t none;
	sigemptyset(&none);
	FD_ZERO(&r);
	FD_SET(done_pipe[0], &r);
	return r_or_errno(pselect(done_pipe[0] + 1, &r, NULL, NULL, timed ? &ts : NULL, &none));
}

static int w_nanosleep(int timed)
{
	(void)timed;
	struct timespec ts = ms_ts(SLICE_MS);
	return nanosleep(&ts, NULL);
}

static int w_clock_nanosleep(int timed)
{
	struct timespec ts = ms_ts(SLICE_MS);
	int e;

	if (timed) { /* absolute */
		clock_gettime(CLOCK_MONOTONIC, &ts);
		ts.tv_nsec += SLICE_MS * 1000000L;
		if (ts.tv_nsec >= 1000000000L) {
			ts.tv_sec++;
			ts.tv_nsec -= 1000000000L;
		}
		e = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
	} else {
		e = clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, NULL);
	}
	errno = e;
	return e ? -1 : 0;
}

static int w_usleep(int timed)
{
	(void)timed;
	return usleep(SLICE_MS * 1000);
}

static int w_sigtimedwait(int timed)
{
	(void)timed;
	sigset_t set;
	struct timespec ts = ms_ts(SLICE_MS);
	sigemptyset(&set);
	sigaddset(&set, SIGWINCH); /* never sent */
	if (sigtimedwait(&set, NULL, &ts) < 0 && errno == EAGAIN)
		return 0;
	return -1;
}

static int w_sem_timedwait(int timed)
{
	(void)timed;
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_nsec += SLICE_MS * 1000000L;
	if (ts.tv_nsec >= 1000000000L) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000L;
	}
	if (sem_timedwait(&never_posted, &ts) < 0 && errno == ETIMEDOUT)
		return 0;
	return -1;
}

static int w_cond_timedwait(int timed)
{
	(void)timed;
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_nsec += SLICE_MS * 1000000L;
	if (ts.tv_nsec >= 1000000000L) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000L;
	}
	pthread_mutex_lock(&mu);
	int e = pthread_cond_timedwait(&never_signalled, &mu, &ts);
	pthread_mutex_unlock(&mu);
	errno = e;
	return e == ETIMEDOUT ? 0 : -1;
}

static uint32_t futex_word; /* never changes: each wait times out */

static int w_futex(int timed)
{
	struct timespec ts = ms_ts(SLICE_MS);
	long r;

	if (timed) { /* FUTEX_WAIT_BITSET: absolute, on CLOCK_MONOTONIC */
		clock_gettime(CLOCK_MONOTONIC, &ts);
		ts.tv_nsec += SLICE_MS * 1000000L;
		if (ts.tv_nsec >= 1000000000L) {
			ts.tv_sec++;
			ts.tv_nsec -= 1000000000L;
		}
		r = syscall(SYS_futex, &futex_word, FUTEX_WAIT_BITSET_PRIVATE, 0, &ts, NULL,
			    FUTEX_BITSET_MATCH_ANY);
	} else { /* FUTEX_WAIT: relative */
		r = syscall(SYS_futex, &futex_word, FUTEX_WAIT_PRIVATE, 0, &ts, NULL, 0);
	}
	return r < 0 && errno == ETIMEDOUT ? 0 : -1;
}

/* pause and sigsuspend end only with SIGUSR1 (the program's), and must end with EINTR. */
static int w_pause(int timed)
{
	(void)timed;
	int r = pause();
	if (r == -1 && errno == EINTR && usr1_seen)
		return 0;
	return -1;
}

static int w_sigsuspend(int timed)
{
	(void)timed;
	sigset_t none;
	sigemptyset(&none);
	int r = sigsuspend(&none);
	if (r == -1 && errno == EINTR && usr1_seen)
		return 0;
	return -1;
}

static struct waiter waiters[] = {
	{.name = "epoll_wait", .wait = w_epoll_wait, .timed = 0},     {.name = "epoll_wait timed", .wait = w_epoll_wait, .timed = 1},
	{.name = "epoll_pwait", .wait = w_epoll_pwait, .timed = 0},   {.name = "epoll_pwait timed", .wait = w_epoll_pwait, .timed = 1},
	{.name = "poll", .wait = w_poll, .timed = 0},                 {.name = "poll timed", .wait = w_poll, .timed = 1},
	{.name = "ppoll", .wait = w_ppoll, .timed = 0},               {.name = "ppoll timed", .wait = w_ppoll, .timed = 1},
	{.name = "select", .wait = w_select, .timed = 0},             {.name = "select timed", .wait = w_select, .timed = 1},
	{.name = "pselect", .wait = w_pselect, .timed = 0},           {.name = "pselect timed", .wait = w_pselect, .timed = 1},
	{.name = "nanosleep", .wait = w_nanosleep, .timed = 1},       {.name = "clock_nanosleep", .wait = w_clock_nanosleep, .timed = 0},
	{.name = "clock_nanosleep abs", .wait = w_clock_nanosleep, .timed = 1}, {.name = "usleep", .wait = w_usleep, .timed = 1},
	{.name = "sigtimedwait", .wait = w_sigtimedwait, .timed = 1}, {.name = "sem_timedwait", .wait = w_sem_timedwait, .timed = 1},
	{.name = "pthread_cond_timedwait", .wait = w_cond_timedwait, .timed = 1},
	{.name = "futex", .wait = w_futex, .timed = 0},
	{.name = "futex abs", .wait = w_futex, .timed = 1},
	{.name = "pause", .wait = w_pause, .timed = 0},               {.name = "sigsuspend", .wait = w_sigsuspend, .timed = 0},
};
#define NWAITERS (int)(sizeof waiters / sizeof waiters[0])

static int is_epoll(struct waiter *w) { return w->wait == w_epoll_wait || w->wait == w_epoll_pwait; }

static int is_signalled(struct waiter *w) { return w->wait == w_pause || w->wait == w_sigsuspend; }

static void *run(void *arg)
{
	struct waiter *w = arg;
	sigset_t usr1;

	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	/* Only the pause and sigsuspend threads take SIGUSR1; sigsuspend's, only inside it. */
	pthread_sigmask(w->wait == w_pause ? SIG_UNBLOCK : SIG_BLOCK, &usr1, NULL);
	do {
		if (w->wait(w->timed) != 0) {
			snprintf(w->problem, sizeof w->problem, "%s returned %s", w->name,
				 errno == EINTR ? "EINTR" : strerror(errno));
			break;
		}
	} while (is_signalled(w) ? !usr1_seen : !stop);
	if (is_signalled(w) && write(ack_pipe[1], "a", 1) != 1)
		snprintf(w->problem, sizeof w->problem, "%s: write ack", w->name);
	return NULL;
}

int main(int argc, char **argv)
{
	int rounds = argc > 1 ? atoi(argv[1]) : 3000;
	int no_epoll = argc > 2 && strcmp(argv[2], "no-epoll") == 0;
	struct sigaction sa;
	struct epoll_event ev = {.events = EPOLLIN};
	uint64_t x = 11;

	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_usr1;
	sigaction(SIGUSR1, &sa, NULL);
	if (pipe(done_pipe) || pipe(ack_pipe) || sem_init(&never_posted, 0, 0))
		fail("pipe/sem_init: %m");
	epfd = epoll_create1(0);
	ev.data.fd = done_pipe[0];
	if (epfd < 0 || epoll_ctl(epfd, EPOLL_CTL_ADD, done_pipe[0], &ev))
		fail("epoll: %m");
	for (int i = 0; i < NWAITERS; i++)
		waiters[i].skip = no_epoll && is_epoll(&waiters[i]);
	for (int i = 0; i < NWAITERS; i++)
		if (!waiters[i].skip && pthread_create(&waiters[i].t, NULL, run, &waiters[i]))
			fail("pthread_create");
	ready();
	for (int r = 0; r < rounds; r++) {
		for (int i = 0; i < 40000; i++)
			x = mix64(x);
		printf("round %d %016llx\n", r, (unsigned long long)x);
		if (r == rounds / 2)
			phase2();
	}
	stop = 1;
	if (write(done_pipe[1], "x", 1) != 1)
		fail("write: %m");
	/* SIGUSR1 until both signalled waiters have answered (one may not be waiting yet). */
	for (int acks = 0; acks < 2;) {
		for (int i = 0; i < NWAITERS; i++)
			if (is_signalled(&waiters[i]))
				pthread_kill(waiters[i].t, SIGUSR1);
		struct pollfd p = {ack_pipe[0], POLLIN, 0};
		char c;
		if (poll(&p, 1, 100) > 0 && read(ack_pipe[0], &c, 1) == 1)
			acks++;
	}
	for (int i = 0; i < NWAITERS; i++)
		if (!waiters[i].skip)
			pthread_join(waiters[i].t, NULL);
	for (int i = 0; i < NWAITERS; i++)
		if (waiters[i].problem[0])
			fail("%s", waiters[i].problem);
	for (int i = 0; i < NWAITERS; i++)
		if (!waiters[i].skip)
			printf("%s: no EINTR\n", waiters[i].name);
	pass();
	return 0;
}
