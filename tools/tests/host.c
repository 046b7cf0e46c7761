/* Prints READY and its PID, then waits for signals forever. With HOST_BLOCK_SIGNALS set it
 * blocks SIGUSR2 and SIGRTMAX-1 (the default checkpoint signal and the quiesce signal that
 * carries requests) first, so that either, sent to it, stays pending, for the tests to see. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(void)
{
    if (getenv("HOST_BLOCK_SIGNALS")) {
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, SIGUSR2);
        sigaddset(&set, SIGRTMAX - 1);
        sigprocmask(SIG_BLOCK, &set, NULL);
    }
    printf("READY %d\n", (int)getpid());
    fflush(stdout);
    for (;;)
        pause();
}
