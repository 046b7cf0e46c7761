/*
 * usr2: a program with its own SIGUSR2 handler, as HotSpot and ruby have. It raises SIGUSR2
 * every round, and every one must reach its handler; sigaction must report that handler and
 * the flags it was installed with. snapshim's checkpoint signal must be another one.
 *
 * Usage: usr2 [ROUNDS]     (default 3000, about 1.5 s here)
 */
#define _GNU_SOURCE
#include <signal.h>
#include <string.h>

#include "common.h"

static volatile sig_atomic_t handled;

static void on_usr2(int sig)
{
	(void)sig;
	handled++;
}

int main(int argc, char **argv)
{
	int rounds = argc > 1 ? atoi(argv[1]) : 3000;
	struct sigaction sa, now;
	uint64_t x = 5;

	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_usr2;
	sa.sa_flags = SA_RESTART;
	if (sigaction(SIGUSR2, &sa, NULL) != 0)
		fail("sigaction: %m");
	if (sigaction(SIGUSR2, NULL, &now) != 0)
		fail("sigaction: %m");
	if (now.sa_handler != on_usr2 || (now.sa_flags & (SA_SIGINFO | SA_RESTART)) != SA_RESTART)
		fail("sigaction reports handler %p flags %#x, not the program's", (void *)now.sa_handler,
		     now.sa_flags);
	ready();
	for (int r = 0; r < rounds; r++) {
		for (int i = 0; i < 40000; i++)
			x = mix64(x);
		raise(SIGUSR2);
		if (handled != r + 1)
			fail("round %d: SIGUSR2 reached the handler %d times", r, (int)handled);
		printf("round %d %016llx\n", r, (unsigned long long)x);
		if (r == rounds / 2)
			phase2();
	}
	printf("SIGUSR2 handled %d times\n", (int)handled);
	pass();
	return 0;
}
