/*
 * signals: signal state that a restore must carry over, checked at the end.
 *
 *   SIGALRM   handler (SA_SIGINFO | SA_ONSTACK | SA_RESTART, mask {SIGHUP}) on an alternate
 *             signal stack, driven by setitimer(ITIMER_REAL) every 1 ms; it checks that it runs on
 *             the alternate stack and spins a little, so checkpoints also land inside it
 *   SIGUSR1   handler (SA_RESTART, mask {SIGTERM, SIGWINCH}), blocked the whole time
 *
 * At the end: the timer still ticks and is still armed with its interval, both dispositions and
 * the mask are unchanged, nothing is pending, the alternate stack is the same, and SIGUSR1, once
 * raised and unblocked, reaches its handler. Tick counts vary run to run and are never printed.
 *
 * Usage: signals [ROUNDS]     (default 180, about 1.5 s here)
 */
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

#define WORDS (1u << 20) /* 8 MiB */
#define ALT_SIZE (64 * 1024)
#define MAX_ROUNDS 1000

static volatile sig_atomic_t ticks, off_altstack, usr1_calls;
static char *alt_base;
/* The first tick that ran off the alternate stack, and where: for the FAIL message. */
static volatile int off_tick = -1;
static void *volatile off_sp;
static volatile pid_t off_tid, main_tid;

static void on_alarm(int sig, siginfo_t *si, void *uc)
{
	char probe;
	volatile uint64_t x = (uint64_t)ticks;

	(void)sig, (void)si, (void)uc;
	if ((&probe < alt_base || &probe >= alt_base + ALT_SIZE) && !off_altstack) {
		off_altstack = 1;
		off_tick = ticks;
		off_sp = &probe;
		off_tid = (pid_t)syscall(SYS_gettid);
	}
	for (int i = 0; i < 40000; i++)
		x = x * 31 + (uint64_t)i;
	ticks++;
}

static void on_usr1(int sig)
{
	(void)sig;
	usr1_calls++;
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void check_action(int sig, const char *name, void *handler, int flags, int in_mask,
			 int in_mask2, int not_in_mask)
{
	struct sigaction sa;

	if (sigaction(sig, NULL, &sa))
		fail("sigaction(%s) query: %s", name, strerror(errno));
	void *got = (flags & SA_SIGINFO) ? (void *)sa.sa_sigaction : (void *)sa.sa_handler;
	if (got != handler)
		fail("%s handler is %p, installed %p", name, got, handler);
	if ((int)(sa.sa_flags & (SA_SIGINFO | SA_ONSTACK | SA_RESTART | SA_RESETHAND | SA_NODEFER)) !=
	    flags)
		fail("%s flags are %#x, installed %#x", name, (unsigned)sa.sa_flags, (unsigned)flags);
	if (!sigismember(&sa.sa_mask, in_mask) || (in_mask2 && !sigismember(&sa.sa_mask, in_mask2)) ||
	    sigismember(&sa.sa_mask, not_in_mask))
		fail("%s handler mask changed", name);
}

int main(int argc, char **argv)
{
	int rounds = argc > 1 ? atoi(argv[1]) : 180;
	uint64_t *a = malloc(WORDS * sizeof *a), sum = 0;
	struct sigaction sa;
	sigset_t block, cur, pending;
	stack_t ss = {0};
	struct itimerval it = {{0, 1000}, {0, 1000}}, cur_it;

	if (rounds < 2 || rounds > MAX_ROUNDS)
		fail("rounds must be in 2..%d", MAX_ROUNDS);
	main_tid = (pid_t)syscall(SYS_gettid);
	alt_base = malloc(ALT_SIZE);
	if (!a || !alt_base)
		fail("malloc failed");
	ss.ss_sp = alt_base;
	ss.ss_size = ALT_SIZE;
	if (sigaltstack(&ss, NULL))
		fail("sigaltstack: %s", strerror(errno));

	memset(&sa, 0, sizeof sa);
	sa.sa_sigaction = on_alarm;
	sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
	sigemptyset(&sa.sa_mask);
	sigaddset(&sa.sa_mask, SIGHUP);
	if (sigaction(SIGALRM, &sa, NULL))
		fail("sigaction(SIGALRM): %s", strerror(errno));

	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigemptyset(&sa.sa_mask);
	sigaddset(&sa.sa_mask, SIGTERM);
	sigaddset(&sa.sa_mask, SIGWINCH);
	if (sigaction(SIGUSR1, &sa, NULL))
		fail("sigaction(SIGUSR1): %s", strerror(errno));

	sigemptyset(&block);
	sigaddset(&block, SIGUSR1);
	if (sigprocmask(SIG_BLOCK, &block, NULL))
		fail("sigprocmask: %s", strerror(errno));
	if (setitimer(ITIMER_REAL, &it, NULL))
		fail("setitimer: %s", strerror(errno));
	for (uint32_t i = 0; i < WORDS; i++)
		a[i] = mix64(i ^ 0x51515151);
	printf("signals: %d rounds, SIGALRM every 1 ms on an alternate stack, SIGUSR1 blocked\n",
	       rounds);
	ready();

	for (int r = 0; r < rounds; r++) {
		if (r == rounds / 2)
			phase2();
		for (int pass = 0; pass < 4; pass++) {
			for (uint32_t i = 0; i < WORDS; i++) {
				a[i] = mix64(a[i] + a[(i * 7 + 1) & (WORDS - 1)] + (uint64_t)r);
				sum ^= a[i];
			}
			printf("round %2d pass %d: %016llx\n", r, pass, (unsigned long long)sum);
		}
	}

	/* The timer still delivers: wait (bounded) for a few more ticks. */
	int seen = ticks;
	double deadline = now() + 2.0;
	while (ticks < seen + 5 && now() < deadline) {
		struct timespec ms = {0, 1000 * 1000};
		nanosleep(&ms, NULL);
	}
	if (ticks < seen + 5)
		fail("the interval timer stopped ticking (%d ticks in 2 s)", ticks - seen);
	printf("ticks > 0: %s\n", ticks > 0 ? "yes" : "no");

	if (getitimer(ITIMER_REAL, &cur_it))
		fail("getitimer: %s", strerror(errno));
	if (cur_it.it_interval.tv_sec != 0 || cur_it.it_interval.tv_usec != 1000)
		fail("ITIMER_REAL interval is %ld.%06ld s, set 0.001000", (long)cur_it.it_interval.tv_sec,
		     (long)cur_it.it_interval.tv_usec);
	if (cur_it.it_value.tv_sec == 0 && cur_it.it_value.tv_usec == 0)
		fail("ITIMER_REAL is disarmed");
	printf("itimer: armed, interval 1 ms\n");

	check_action(SIGALRM, "SIGALRM", (void *)on_alarm, SA_SIGINFO | SA_ONSTACK | SA_RESTART,
		     SIGHUP, 0, SIGTERM);
	check_action(SIGUSR1, "SIGUSR1", (void *)on_usr1, SA_RESTART, SIGTERM, SIGWINCH, SIGHUP);
	printf("handlers: unchanged\n");

	if (sigprocmask(SIG_BLOCK, NULL, &cur))
		fail("sigprocmask query: %s", strerror(errno));
	if (!sigismember(&cur, SIGUSR1))
		fail("SIGUSR1 is no longer blocked");
	if (sigismember(&cur, SIGALRM))
		fail("SIGALRM got blocked");
	if (sigpending(&pending))
		fail("sigpending: %s", strerror(errno));
	for (int s = 1; s < NSIG; s++)
		if (sigismember(&pending, s) == 1)
			fail("signal %d (%s) is pending", s, strsignal(s));
	printf("mask: SIGUSR1 blocked, nothing pending\n");

	if (sigaltstack(NULL, &ss))
		fail("sigaltstack query: %s", strerror(errno));
	if (ss.ss_sp != alt_base || ss.ss_size != ALT_SIZE || ss.ss_flags != 0)
		fail("alternate stack is %p+%zu flags %d, set %p+%d", ss.ss_sp, ss.ss_size, ss.ss_flags,
		     (void *)alt_base, ALT_SIZE);
	if (off_altstack)
		fail("SIGALRM handler ran off the alternate stack (first at tick %d of %d, stack "
		     "near %p, alternate stack %p+%d, on tid %d; the app's one thread had tid %d "
		     "at start)",
		     off_tick, (int)ticks, off_sp, (void *)alt_base, ALT_SIZE, (int)off_tid,
		     (int)main_tid);
	printf("altstack: unchanged, every tick on it\n");

	/* SIGUSR1 still reaches its handler: raise it while blocked, see it pending, unblock. */
	if (usr1_calls)
		fail("SIGUSR1 handler ran while blocked");
	raise(SIGUSR1);
	if (sigpending(&pending) || !sigismember(&pending, SIGUSR1))
		fail("raised SIGUSR1 is not pending");
	sigprocmask(SIG_UNBLOCK, &block, NULL);
	if (usr1_calls != 1)
		fail("SIGUSR1 handler ran %d times, want 1", (int)usr1_calls);
	printf("SIGUSR1: delivered once after unblocking\n");

	memset(&it, 0, sizeof it);
	setitimer(ITIMER_REAL, &it, NULL);
	printf("final: %016llx\n", (unsigned long long)sum);
	pass();
	return 0;
}
