/*
 * events: an event loop on epoll over eventfds, timerfds, a signalfd and pipes, each in the
 * state a restore must give back, printed every round (so the round right after a restore shows
 * what the restore made of them) and checked at the end.
 *
 *   ep        epoll, watching:
 *     e2        eventfd through a nested epoll ep2 (ep watches ep2, level-triggered)
 *     e3        eventfd, EPOLLEXCLUSIVE, written through its duplicate e3w (dup)
 *     p1        pipe read end, EPOLLET (drained until EAGAIN at each event)
 *     p2        pipe read end, EPOLLONESHOT, re-armed with EPOLL_CTL_MOD after each event
 *     d2        eventfd registered under another number, closed since (d2 is its dup)
 *     tick      timerfd CLOCK_MONOTONIC, 1 ms interval (ticks vary run to run: never printed)
 *     sfd       signalfd {SIGUSR1, SIGRTMIN+3}, never ready until the end
 *   sem       eventfd in semaphore mode, count ROUNDS + 1000, one taken per round
 *   tx        timerfd that expired once at start (1 ns, interval 1 h) and is never read until
 *             the end: exactly 1 expiration must be read then
 *   tr        timerfd CLOCK_MONOTONIC relative 1 h; ta CLOCK_REALTIME absolute (1 h ahead,
 *             TFD_TIMER_CANCEL_ON_SET); tm CLOCK_MONOTONIC absolute (1 h ahead), interval 2 s
 *
 * Each round writes round+1 to e2 and e3, 3 bytes to p1, 2 to p2, then waits on ep until it has
 * them all (retrying EINTR), takes one from sem, computes a little, and prints the rounds's
 * values with the objects' fdinfo state (counts, masks, clocks, flags, intervals, whether armed,
 * every registration's events and data word, sorted by data word).
 * At the end: SIGUSR1 and SIGRTMIN+3 (value 77) raised while blocked are read from sfd, tx gives
 * 1 expiration, tr has time left, tick still fires, sem's count is what the rounds left.
 *
 * Usage: events [ROUNDS] [inotify|pidfd]   (default 2500, about 1.5 s here).
 *   inotify  also an inotify descriptor watching ev-b (IN_CREATE | IN_DELETE, watch 2: ev-a had
 *            watch 1, removed since) and ev-c (IN_CREATE | IN_ONESHOT, watch 3), relative to
 *            the working directory; each round makes a directory ev-b/rN-<random>, waits for
 *            its IN_CREATE, and prints the watches (number:mask). An IN_Q_OVERFLOW (what a
 *            restore gives) is answered as programs do, by looking again: it exists. Their count is
 *            reported on stderr at the end ("INOTIFY overflows N").
 *   pidfd    also holds a pidfd (which snapshim does not restore); at the end a read on it is
 *            reported on stderr ("PIDFD <errno name>": EINVAL from a pidfd).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <sys/random.h>
#include <poll.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

enum { D_E2 = 0xe2e2, D_E3 = 0xe3, D_P1 = 0x1122334455667788ULL, D_P2 = 0xb2, D_D2 = 0xd0d0,
       D_TICK = 0x7, D_SFD = 0x5f };

static int ep, ep2, e2, e3, e3w, p1[2], p2[2], d2, tick, sfd, sem, tx, tr, ta, tm;
static uint64_t ticks;
static void check(int ok, const char *what)
{
	if (!ok)
		fail("%s: %s", what, strerror(errno));
}

static int in = -1, overflows;

static void setup_inotify(void)
{
	int wa;

	for (const char *d = "ev-a\0ev-b\0ev-c\0"; *d; d += strlen(d) + 1)
		check(mkdir(d, 0700) == 0 || errno == EEXIST, "mkdir");
	check((in = inotify_init1(IN_NONBLOCK | IN_CLOEXEC)) >= 0, "inotify_init1");
	check((wa = inotify_add_watch(in, "ev-a", IN_CREATE)) == 1, "inotify_add_watch ev-a");
	check(inotify_add_watch(in, "ev-b", IN_CREATE | IN_DELETE) == 2, "inotify_add_watch ev-b");
	check(inotify_rm_watch(in, wa) == 0, "inotify_rm_watch");
	check(inotify_add_watch(in, "ev-c", IN_CREATE | IN_ONESHOT) == 3, "inotify_add_watch ev-c");
}

/*
 * Makes a directory ev-b/rN-<random> and waits until inotify reports it (or an overflow says it
 * may not). What a round leaves in the file system outlives a restore (the original may have run
 * on past the checkpoint before it was killed), so a round must not depend on it: a directory
 * (no descriptor open across the round), a name no run used (a collision with one the original
 * made after the checkpoint is made again), never removed (so looking again after an overflow
 * finds it).
 */
static void inotify_round(int i)
{
	char name[64], path[96], buf[4096] __attribute__((aligned(8)));
	struct pollfd p = { .fd = in, .events = POLLIN };
	int seen = 0;

	for (;;) {
		uint64_t r;
		check(getrandom(&r, sizeof r, 0) == sizeof r, "getrandom");
		snprintf(name, sizeof name, "r%d-%016llx", i, (unsigned long long)r);
		snprintf(path, sizeof path, "ev-b/%s", name);
		if (mkdir(path, 0700) == 0)
			break;
		check(errno == EEXIST, "make a directory in ev-b");
	}
	while (!seen) {
		ssize_t n = read(in, buf, sizeof buf);
		if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
			check(poll(&p, 1, -1) >= 0 || errno == EINTR, "poll inotify");
			continue;
		}
		check(n > 0, "read inotify");
		for (char *q = buf; q < buf + n;) {
			struct inotify_event *e = (struct inotify_event *)q;
			struct stat st;
			if (e->mask & IN_Q_OVERFLOW) {
				overflows++;
				check(stat(path, &st) == 0, "look again after an overflow");
				seen = 1;
			} else if (e->wd == 2 && (e->mask & IN_CREATE) && !strcmp(e->name, name)) {
				seen = 1;
			}
			q += sizeof *e + e->len;
		}
	}
}

/* "wd:mask" of every watch of `in`, sorted by wd (fdinfo lists them newest first). */
static void inotify_watches(char *out, size_t len)
{
	char path[64], buf[4096];
	int wd[8], n = 0;
	unsigned mask[8];
	FILE *f;
	size_t got;

	snprintf(path, sizeof path, "/proc/self/fdinfo/%d", in);
	check((f = fopen(path, "r")) != NULL, "open fdinfo");
	got = fread(buf, 1, sizeof buf - 1, f);
	fclose(f);
	buf[got] = 0;
	for (char *l = strtok(buf, "\n"); l && n < 8; l = strtok(NULL, "\n")) {
		char *w = strstr(l, "wd:"), *m = strstr(l, " mask:");
		if (!strncmp(l, "inotify ", 8) && w && m && sscanf(w, "wd:%d", &wd[n]) == 1 &&
		    sscanf(m, " mask:%x", &mask[n]) == 1)
			n++;
	}
	out[0] = 0;
	for (int a = 0; a < n; a++) {
		int best = a;
		for (int b = a + 1; b < n; b++)
			if (wd[b] < wd[best])
				best = b;
		int tw = wd[a];
		unsigned tm = mask[a];
		wd[a] = wd[best], mask[a] = mask[best];
		wd[best] = tw, mask[best] = tm;
		snprintf(out + strlen(out), len - strlen(out), "%s%d:%x", a ? "," : "", wd[a], mask[a]);
	}
}

static int new_timer(int clock, int flags, long long value_ns, long long interval_ns)
{
	int fd = timerfd_create(clock, TFD_NONBLOCK | TFD_CLOEXEC);
	struct itimerspec its = { { interval_ns / 1000000000, interval_ns % 1000000000 },
				  { value_ns / 1000000000, value_ns % 1000000000 } };

	check(fd >= 0, "timerfd_create");
	if (flags & TFD_TIMER_ABSTIME) {
		struct timespec now;
		clock_gettime(clock, &now);
		its.it_value.tv_sec += now.tv_sec;
	}
	check(timerfd_settime(fd, flags, &its, NULL) == 0, "timerfd_settime");
	return fd;
}

static void watch(int epfd, int fd, uint32_t events, uint64_t data)
{
	struct epoll_event ev = { .events = events, .data.u64 = data };
	check(epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) == 0, "epoll_ctl ADD");
}

static void setup(void)
{
	sigset_t mask;
	int d;

	check((ep = epoll_create1(EPOLL_CLOEXEC)) >= 0, "epoll_create1");
	check((ep2 = epoll_create1(0)) >= 0, "epoll_create1");
	check((e2 = eventfd(0, EFD_NONBLOCK)) >= 0, "eventfd");
	check((e3 = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) >= 0, "eventfd");
	check((e3w = dup(e3)) >= 0, "dup");
	check(pipe2(p1, O_NONBLOCK) == 0 && pipe2(p2, O_NONBLOCK) == 0, "pipe2");
	check((d = eventfd(0, EFD_NONBLOCK)) >= 0, "eventfd");
	check((d2 = dup(d)) >= 0, "dup");
	sigemptyset(&mask);
	sigaddset(&mask, SIGUSR1);
	sigaddset(&mask, SIGRTMIN + 3);
	check(sigprocmask(SIG_BLOCK, &mask, NULL) == 0, "sigprocmask");
	check((sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC)) >= 0, "signalfd");
	tick = new_timer(CLOCK_MONOTONIC, 0, 1000000, 1000000);
	tx = new_timer(CLOCK_MONOTONIC, 0, 1, 3600LL * 1000000000);
	tr = new_timer(CLOCK_MONOTONIC, 0, 3600LL * 1000000000, 0);
	ta = new_timer(CLOCK_REALTIME, TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET,
		       3600LL * 1000000000, 0);
	tm = new_timer(CLOCK_MONOTONIC, TFD_TIMER_ABSTIME, 3600LL * 1000000000, 2000000000);

	watch(ep2, e2, EPOLLIN, D_E2);
	watch(ep, ep2, EPOLLIN, D_E2);
	watch(ep, e3, EPOLLIN | EPOLLEXCLUSIVE, D_E3);
	watch(ep, p1[0], EPOLLIN | EPOLLET, D_P1);
	watch(ep, p2[0], EPOLLIN | EPOLLONESHOT, D_P2);
	watch(ep, d, EPOLLIN, D_D2);
	close(d);
	watch(ep, tick, EPOLLIN, D_TICK);
	watch(ep, sfd, EPOLLIN, D_SFD);
}

static uint64_t take(int fd)
{
	uint64_t v = 0;
	ssize_t n = read(fd, &v, sizeof v);

	check(n == 8 || (n < 0 && errno == EAGAIN), "read an eventfd or timerfd");
	return n == 8 ? v : 0;
}

static int drain(int fd)
{
	char buf[64];
	int got = 0;
	ssize_t n;

	while ((n = read(fd, buf, sizeof buf)) > 0)
		got += (int)n;
	check(n < 0 && errno == EAGAIN, "drain a pipe");
	return got;
}

struct round { uint64_t e2, e3, d2; int p1, p2; };

static void handle(const struct epoll_event *ev, struct round *r)
{
	struct epoll_event inner;
	int n;

	switch (ev->data.u64) {
	case D_E2:
		n = epoll_wait(ep2, &inner, 1, 0);
		check(n >= 0 || errno == EINTR, "epoll_wait ep2");
		if (n == 1)
			r->e2 += take(e2);
		break;
	case D_E3: r->e3 += take(e3); break;
	case D_D2: r->d2 += take(d2); break;
	case D_P1: r->p1 += drain(p1[0]); break;
	case D_P2: {
		struct epoll_event re = { .events = EPOLLIN | EPOLLONESHOT, .data.u64 = D_P2 };
		r->p2 += drain(p2[0]);
		check(epoll_ctl(ep, EPOLL_CTL_MOD, p2[0], &re) == 0, "epoll_ctl MOD");
		break;
	}
	case D_TICK: ticks += take(tick); break;
	default: fail("unexpected event %#llx (events %#x)", (unsigned long long)ev->data.u64,
		      ev->events);
	}
}

static void one_round(int i)
{
	uint64_t v = (uint64_t)i + 1;
	struct round r = { 0 };
	struct epoll_event evs[8];

	check(write(e2, &v, 8) == 8 && write(e3w, &v, 8) == 8 && write(d2, &v, 8) == 8, "write");
	check(write(p1[1], "abc", 3) == 3 && write(p2[1], "de", 2) == 2, "write a pipe");
	while (r.e2 < v || r.e3 < v || r.d2 < v || r.p1 < 3 || r.p2 < 2) {
		int n = epoll_wait(ep, evs, 8, -1);
		if (n < 0 && errno == EINTR)
			continue;
		check(n > 0, "epoll_wait");
		for (int k = 0; k < n; k++)
			handle(&evs[k], &r);
	}
	if (r.e2 != v || r.e3 != v || r.d2 != v || r.p1 != 3 || r.p2 != 2)
		fail("round %d got e2 %llu e3 %llu d2 %llu p1 %d p2 %d", i,
		     (unsigned long long)r.e2, (unsigned long long)r.e3, (unsigned long long)r.d2,
		     r.p1, r.p2);
	check(take(sem) == 1, "read the semaphore");
}

/* The value after `key` in /proc/self/fdinfo/FD, or "-". */
static const char *field(int fd, const char *key, char *out, size_t len)
{
	char path[64], buf[4096];
	FILE *f;
	size_t n;

	snprintf(path, sizeof path, "/proc/self/fdinfo/%d", fd);
	f = fopen(path, "r");
	check(f != NULL, "open fdinfo");
	n = fread(buf, 1, sizeof buf - 1, f);
	fclose(f);
	buf[n] = 0;
	snprintf(out, len, "-");
	for (char *l = strtok(buf, "\n"); l; l = strtok(NULL, "\n"))
		if (!strncmp(l, key, strlen(key))) {
			l += strlen(key);
			while (*l == ' ' || *l == '\t')
				l++;
			snprintf(out, len, "%s", l);
		}
	return out;
}

/* "data:events" of every registration of ep, sorted by data word. */
static void registrations(char *out, size_t len)
{
	char path[64], buf[4096];
	unsigned long long data[16];
	unsigned events[16];
	int n = 0;
	FILE *f;
	size_t got;

	snprintf(path, sizeof path, "/proc/self/fdinfo/%d", ep);
	check((f = fopen(path, "r")) != NULL, "open fdinfo");
	got = fread(buf, 1, sizeof buf - 1, f);
	fclose(f);
	buf[got] = 0;
	for (char *l = strtok(buf, "\n"); l && n < 16; l = strtok(NULL, "\n")) {
		int tfd;
		if (sscanf(l, "tfd: %d events: %x data: %llx", &tfd, &events[n], &data[n]) == 3)
			n++;
	}
	for (int a = 0; a < n; a++)
		for (int b = a + 1; b < n; b++)
			if (data[b] < data[a]) {
				unsigned long long t = data[a];
				unsigned te = events[a];
				data[a] = data[b], events[a] = events[b];
				data[b] = t, events[b] = te;
			}
	out[0] = 0;
	for (int a = 0; a < n; a++)
		snprintf(out + strlen(out), len - strlen(out), "%s%llx:%x", a ? "," : "", data[a],
			 events[a]);
}

static int armed(int fd)
{
	struct itimerspec its;
	check(timerfd_gettime(fd, &its) == 0, "timerfd_gettime");
	return its.it_value.tv_sec || its.it_value.tv_nsec;
}

static void report(int i)
{
	char a[64], b[64], c[64], d[64], e[64], g[64], h[64], k[64], regs[512];

	registrations(regs, sizeof regs);
	printf("round %d sem %s/%s sigmask %s ta %s,%s,%d tm %s,%s,%s,%d tr %d ep %s\n", i,
	       field(sem, "eventfd-count:", a, sizeof a),
	       field(sem, "eventfd-semaphore:", b, sizeof b), field(sfd, "sigmask:", c, sizeof c),
	       field(ta, "clockid:", d, sizeof d), field(ta, "settime flags:", e, sizeof e),
	       armed(ta), field(tm, "clockid:", g, sizeof g),
	       field(tm, "settime flags:", h, sizeof h), field(tm, "it_interval:", k, sizeof k),
	       armed(tm), armed(tr), regs);
}

static void final_checks(int rounds)
{
	struct signalfd_siginfo si;
	union sigval val = { .sival_int = 77 };
	struct itimerspec its;
	struct epoll_event ev;
	uint64_t n;

	check(kill(getpid(), SIGUSR1) == 0 && sigqueue(getpid(), SIGRTMIN + 3, val) == 0, "raise");
	check(read(sfd, &si, sizeof si) == sizeof si, "read the signalfd");
	if (si.ssi_signo != SIGUSR1)
		fail("signalfd gave signal %u first, not SIGUSR1", si.ssi_signo);
	check(read(sfd, &si, sizeof si) == sizeof si, "read the signalfd");
	if (si.ssi_signo != (unsigned)SIGRTMIN + 3 || si.ssi_int != 77)
		fail("signalfd gave signal %u value %d, not SIGRTMIN+3 with 77", si.ssi_signo,
		     si.ssi_int);
	if ((n = take(tx)) != 1)
		fail("the timer that expired once at start gives %llu expirations",
		     (unsigned long long)n);
	check(timerfd_gettime(tr, &its) == 0, "timerfd_gettime");
	if (its.it_value.tv_sec >= 3600 || (!its.it_value.tv_sec && !its.it_value.tv_nsec))
		fail("the 1 h relative timer has %lld s left", (long long)its.it_value.tv_sec);
	char left[64];
	(void)rounds;
	if ((n = take(sem)) != 1 || strcmp(field(sem, "eventfd-count:", left, sizeof left), "3e7"))
		fail("the semaphore gave %llu and has %s left, not 1 and 999 (3e7)",
		     (unsigned long long)n, left);
	/* The 1 ms timer still fires: wait for it alone. */
	int only = epoll_create1(0);
	watch(only, tick, EPOLLIN, 1);
	while (epoll_wait(only, &ev, 1, -1) != 1)
		check(errno == EINTR, "epoll_wait for the tick");
	printf("signals, timers and semaphore as expected; the tick fires\n");
}

int main(int argc, char **argv)
{
	int rounds = argc > 1 ? atoi(argv[1]) : 2500;
	const char *mode = argc > 2 ? argv[2] : "";
	int pidfd = -1;
	volatile uint64_t x = 0;

	if (rounds <= 0 || rounds > 100000)
		fail("bad ROUNDS %s", argv[1]);
	setup();
	check((sem = eventfd(0, EFD_SEMAPHORE | EFD_NONBLOCK)) >= 0, "eventfd");
	uint64_t start = 1000 + (uint64_t)rounds;
	check(write(sem, &start, 8) == 8, "write the semaphore");
	if (!strcmp(mode, "inotify"))
		setup_inotify();
	else if (!strcmp(mode, "pidfd"))
		check((pidfd = (int)syscall(SYS_pidfd_open, getpid(), 0)) >= 0, "pidfd_open");
	else if (*mode)
		fail("unknown mode %s", mode);
	ready();
	for (int i = 0; i < rounds; i++) {
		one_round(i);
		if (in >= 0) {
			char w[128];
			inotify_round(i);
			inotify_watches(w, sizeof w);
			printf("inotify r%d watches %s\n", i, w);
		}
		for (int k = 0; k < 100000; k++)
			x = mix64(x + (uint64_t)k);
		report(i);
		if (i == rounds / 2)
			phase2();
	}
	final_checks(rounds);
	if (in >= 0)
		fprintf(stderr, "INOTIFY overflows %d\n", overflows);
	if (pidfd >= 0) {
		char buf[64];
		ssize_t n = read(pidfd, buf, sizeof buf);
		fprintf(stderr, "PIDFD %s\n", n >= 0 ? "read" : strerrorname_np(errno));
	}
	(void)x;
	pass();
	return 0;
}
